"""DVC stage pack: prepared splits + tokenizer -> data/packed/*.npz + padding report."""

from rnnflow.core.config import load_params
from rnnflow.data.pack import pack
from rnnflow.runtime.stagecli import run_stage


def main() -> None:
    report = pack(load_params())
    pad = report["padding_train_epoch"]
    print(
        f"pack: pad fraction {pad['bucketed']['pad_fraction']:.2%} bucketed vs "
        f"{pad['global_max']['pad_fraction']:.2%} padded to the global max"
    )


if __name__ == "__main__":
    run_stage(main, "pack")
