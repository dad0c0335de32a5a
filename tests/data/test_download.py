"""The real download code, offline: a local HTTP server serves files the test makes."""

import csv
import hashlib
import http.server
import io
import tarfile
import threading
from functools import partial

import pytest

from rnnflow.core.errors import RnnflowError
from rnnflow.data.download import RemoteFile, fetch
from rnnflow.data.sources import BENCHMARKS, Benchmark, load_benchmark


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1; yields (base_url, directory)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    httpd.shutdown()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_verifies_and_caches(server, tmp_path):
    base, www = server
    data = b"label,text\n" * 1000
    (www / "f.csv").write_bytes(data)
    cache = tmp_path / "cache"
    remote = RemoteFile(f"{base}/f.csv", _sha(data), "f.csv")
    path = fetch(remote, cache)
    assert path.read_bytes() == data
    (www / "f.csv").unlink()  # a second call must not need the network
    assert fetch(remote, cache) == path
    assert list(cache.iterdir()) == [path]


def test_wrong_checksum_is_an_error_and_leaves_nothing(server, tmp_path):
    base, www = server
    (www / "f.csv").write_bytes(b"tampered")
    cache = tmp_path / "cache"
    remote = RemoteFile(f"{base}/f.csv", "0" * 64, "f.csv")
    with pytest.raises(RnnflowError, match=r"f.csv: sha256 mismatch \(expected 0000"):
        fetch(remote, cache)
    assert list(cache.iterdir()) == []


def test_unreachable_url_is_a_clear_error(server, tmp_path):
    base, _ = server
    remote = RemoteFile(f"{base}/missing.csv", "0" * 64, "missing.csv")
    with pytest.raises(RnnflowError, match="missing.csv: download failed"):
        fetch(remote, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_stale_cache_entry_is_replaced(server, tmp_path):
    base, www = server
    (www / "f.csv").write_bytes(b"good")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "f.csv").write_bytes(b"corrupted")
    path = fetch(RemoteFile(f"{base}/f.csv", _sha(b"good"), "f.csv"), cache)
    assert path.read_bytes() == b"good"


def _ag_news_csv(rows) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL).writerows(rows)
    return buf.getvalue().encode()


def test_ag_news_format_parses_from_local_server(server, tmp_path):
    base, www = server
    train = _ag_news_csv([["3", "Stocks up", "Markets rallied \\ today"], ["2", "Cup final", "x"]])
    test = _ag_news_csv([["4", "New chip", "Faster"], ["9", "odd", "class"], ["1", "short"]])
    (www / "train.csv").write_bytes(train)
    (www / "test.csv").write_bytes(test)
    real = BENCHMARKS["ag_news"]
    local = Benchmark(
        files=(
            RemoteFile(f"{base}/train.csv", _sha(train), real.files[0].name),
            RemoteFile(f"{base}/test.csv", _sha(test), real.files[1].name),
        ),
        parse=real.parse,
    )
    table = load_benchmark("ag_news", tmp_path / "raw", {"ag_news": local})
    assert table.labels == ["Business", "Sports", "Sci/Tech"]
    assert table.texts[0] == "Stocks up. Markets rallied   today"
    assert dict(table.dropped) == {"missing_label": 1, "malformed_row": 1}


def test_imdb_format_parses_from_local_server(server, tmp_path):
    base, www = server
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in [
            ("aclImdb/train/pos/0_9.txt", b"Great<br />film"),
            ("aclImdb/test/neg/1_2.txt", b"Dull"),
            ("aclImdb/train/unsup/2_0.txt", b"unlabelled"),
            ("aclImdb/README", b"readme"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    data = buf.getvalue()
    (www / "imdb.tar.gz").write_bytes(data)
    real = BENCHMARKS["imdb"]
    local = Benchmark(
        files=(RemoteFile(f"{base}/imdb.tar.gz", _sha(data), real.files[0].name),),
        parse=real.parse,
    )
    table = load_benchmark("imdb", tmp_path / "raw", {"imdb": local})
    assert sorted(zip(table.texts, table.labels, strict=True)) == [
        ("Dull", "neg"),
        ("Great film", "pos"),
    ]


def test_benchmarks_pin_canonical_urls_and_sha256():
    for bench in BENCHMARKS.values():
        for remote in bench.files:
            assert remote.url.startswith("https://")
            assert len(remote.sha256) == 64 and int(remote.sha256, 16) >= 0
