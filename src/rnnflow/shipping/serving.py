"""The raw-text MLflow model: a column of texts in, a label and per-class probabilities out.

export@VARIANT logs it beside the ONNX model and registers it as `rnnflow`; compare points the
alias `champion` at the best variant that passed the parity gate; `make serve` runs
`mlflow models serve -m models:/rnnflow@champion`. Inside: the exported bundle (model.onnx,
tokenizer.json, labels.json, bundle.json) run by rnnflow.predict, i.e. onnxruntime, tokenizers
and numpy; torch is never imported at load or predict.

A bad request (not a list of non-empty strings, too many texts, a text too long) raises
MlflowException's invalid-parameter error, which MLflow's scoring server answers with 400 and
the message. This file is logged as the model's code ("models from code"); MLflow runs it at
load time, and its last line hands MLflow the model.
"""

import pydantic
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

# The model's config, overridable when it is loaded (model_config): the request limits (the
# scoring server holds a whole request in memory, so both bound what one request can cost),
# and which of the bundle's two ONNX models answers, fp32 (model.onnx, the one the parity
# gate proves) or int8 (model.int8.onnx, smaller, within the int8 gate's accuracy drop).
LIMITS = {"max_batch": 1000, "max_text_chars": 10_000, "precision": "fp32"}


class Prediction(pydantic.BaseModel):
    """One text's answer."""

    label: str
    probability: float
    probabilities: dict[str, float]


def check_texts(texts: object, max_batch: int, max_text_chars: int) -> list[str]:
    """The texts of a request, or one error naming the first bad entry."""
    if not isinstance(texts, list):
        raise MlflowException.invalid_parameter_value(
            f"inputs must be a list of strings, got {type(texts).__name__}"
        )
    if not texts:
        raise MlflowException.invalid_parameter_value("inputs is empty; send at least one text")
    if len(texts) > max_batch:
        raise MlflowException.invalid_parameter_value(
            f"inputs has {len(texts)} texts; at most {max_batch} per request"
        )
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise MlflowException.invalid_parameter_value(
                f"inputs[{i}] is {type(text).__name__}, not a string"
            )
        if not text.strip():
            raise MlflowException.invalid_parameter_value(
                f"inputs[{i}] is empty; nothing to classify"
            )
        if len(text) > max_text_chars:
            raise MlflowException.invalid_parameter_value(
                f"inputs[{i}] has {len(text)} characters; at most {max_text_chars}"
            )
    return texts


class TextClassifier(PythonModel):
    """mlflow.pyfunc model over an exported bundle (artifact `bundle`)."""

    def load_context(self, context) -> None:
        from rnnflow.shipping.predict import Predictor

        config = LIMITS | dict(context.model_config or {})
        if config["precision"] not in ("fp32", "int8"):
            raise MlflowException.invalid_parameter_value(
                f"model_config precision: expected fp32 or int8, got {config['precision']!r}"
            )
        self.predictor = Predictor(context.artifacts["bundle"], int8=config["precision"] == "int8")
        self.limits = {key: config[key] for key in ("max_batch", "max_text_chars")}

    def predict(self, context, model_input: list[str], params=None) -> list[Prediction]:
        texts = check_texts(model_input, **self.limits)
        return [
            Prediction(
                label=r["label"], probability=r["probability"], probabilities=r["probabilities"]
            )
            for r in self.predictor.predict(texts)
        ]


set_model(TextClassifier())
