"""The weights resolver: search order, offline switch, and the missing-model message."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from promptist_core.weights import (
    FileModel,
    WeightsNotFoundError,
    download_file,
    downloads_allowed,
    resolve,
    resolve_file,
    resolve_tokenizer,
)


def make_folder(path: Path, files=("config.json", "model.safetensors", "vocab.json")) -> Path:
    path.mkdir(parents=True)
    for f in files:
        (path / f).write_text("{}")
    return path


def test_explicit_path_wins(tmp_path):
    folder = make_folder(tmp_path / "anywhere" / "my-policy")
    assert resolve(str(folder), models_dir=tmp_path / "models") == folder


def test_host_models_folder_is_searched_by_the_last_part_of_a_hub_id(tmp_path):
    folder = make_folder(tmp_path / "models" / "Promptist")
    assert resolve("microsoft/Promptist", models_dir=tmp_path / "models", allow_download=False) == folder


def test_several_models_folders_are_searched_in_order(tmp_path):
    second = make_folder(tmp_path / "b" / "policy")
    assert resolve("policy", models_dir=[tmp_path / "a", tmp_path / "b"]) == second


def test_missing_model_error_names_the_model_every_place_and_the_folder_to_use(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError) as e:
        resolve("microsoft/Promptist", models_dir=tmp_path / "models", allow_download=False)
    message = str(e.value)
    assert "'microsoft/Promptist'" in message
    assert str(tmp_path / "models" / "Promptist") in message  # where to put the files
    assert "models folder" in message and "Hugging Face cache" in message
    assert "config.json" in message and "model.safetensors" in message
    assert "downloads are disabled" in message


def test_incomplete_folder_names_the_missing_file(tmp_path):
    folder = make_folder(tmp_path / "half", files=("config.json",))
    with pytest.raises(WeightsNotFoundError, match="missing model.safetensors or pytorch_model.bin"):
        resolve(str(folder), required=(("config.json",), ("model.safetensors", "pytorch_model.bin")))


def test_a_path_that_does_not_exist_is_reported_as_such(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve(str(tmp_path / "nope"))


@pytest.mark.parametrize("var", ["PROMPTIST_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_environment_forbids_downloads(monkeypatch, var):
    for v in ("PROMPTIST_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    assert downloads_allowed() is True
    monkeypatch.setenv(var, "1")
    assert downloads_allowed() is False
    assert downloads_allowed(True) is True  # an explicit argument wins


def test_tokenizer_falls_back_to_gpt2_for_promptist_and_says_where_to_put_it(tmp_path):
    policy = make_folder(tmp_path / "models" / "Promptist", files=("config.json", "model.safetensors"))
    with pytest.raises(WeightsNotFoundError) as e:
        resolve_tokenizer(policy, "microsoft/Promptist", models_dir=tmp_path / "models", allow_download=False)
    assert "openai-community/gpt2" in str(e.value)
    assert f"copy GPT-2's tokenizer files (vocab.json, merges.txt) into {policy}" in str(e.value)
    gpt2 = make_folder(tmp_path / "models" / "gpt2", files=("config.json", "vocab.json"))
    assert resolve_tokenizer(policy, "microsoft/Promptist", models_dir=tmp_path / "models") == gpt2


def test_single_file_is_found_in_the_models_folder_or_named_when_missing(tmp_path):
    known = FileModel("head.pth", "https://example.invalid/head.pth", "0" * 64)
    with pytest.raises(WeightsNotFoundError) as e:
        resolve_file("head", known=known, models_dir=tmp_path, allow_download=False)
    assert str(tmp_path / "head.pth") in str(e.value) and "https://example.invalid/head.pth" in str(e.value)
    (tmp_path / "head.pth").write_bytes(b"x")
    assert resolve_file("head", known=known, models_dir=tmp_path) == tmp_path / "head.pth"


def test_download_checks_sha256_and_leaves_no_partial_file(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(b"weights" * 100)
    good = hashlib.sha256(source.read_bytes()).hexdigest()
    target = tmp_path / "out" / "w.bin"
    assert download_file(source.as_uri(), target, good).read_bytes() == source.read_bytes()
    bad_target = tmp_path / "out" / "bad.bin"
    with pytest.raises(OSError, match="sha256 mismatch"):
        download_file(source.as_uri(), bad_target, "f" * 64)
    assert not bad_target.exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["w.bin"]


def closed_port() -> int:
    """A local port nothing listens on: connecting is refused, as on a machine without network."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def network_calls(monkeypatch):
    """Counts every network attempt: urllib requests (with their timeout) and huggingface_hub downloads,
    which fail at once here instead of retrying for half a minute."""
    import urllib.request

    import huggingface_hub

    calls = []
    real_urlopen = urllib.request.urlopen

    def urlopen(url, *args, timeout=None, **kwargs):
        calls.append(("urlopen", getattr(url, "full_url", url), timeout))
        return real_urlopen(url, *args, timeout=timeout, **kwargs)

    def hub_call(name, real):
        def call(*args, **kwargs):
            if kwargs.get("local_files_only"):
                return real(*args, **kwargs)
            calls.append((name, args, kwargs))
            raise ConnectionError(f"{name}: no network in this test")
        return call

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    for name in ("snapshot_download", "list_repo_files", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, hub_call(name, getattr(huggingface_hub, name)))
    return calls


def test_an_unreachable_hub_fails_after_one_short_probe_and_says_how_to_go_offline(tmp_path, monkeypatch,
                                                                                   network_calls):
    from promptist_core.weights import REACHABILITY_TIMEOUT_S

    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError) as e:
        resolve("microsoft/Promptist", models_dir=tmp_path / "models", allow_download=True)
    # One request, with a timeout of a few seconds, and no huggingface_hub download (its retries took ~30 s).
    assert network_calls == [("urlopen", endpoint, REACHABILITY_TIMEOUT_S)]
    assert REACHABILITY_TIMEOUT_S <= 5
    message = str(e.value)
    assert f"the Hugging Face Hub ({endpoint}) cannot be reached" in message
    assert "PROMPTIST_OFFLINE=1" in message and "HF_HUB_OFFLINE=1" in message
    assert str(tmp_path / "models" / "Promptist") in message


def test_a_reachable_hub_is_downloaded_from(tmp_path, monkeypatch, network_calls):
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        with pytest.raises(WeightsNotFoundError, match="no network in this test"):
            resolve("microsoft/Promptist", models_dir=tmp_path / "models", allow_download=True)
    finally:
        server.shutdown()
        server.server_close()
    assert [c[0] for c in network_calls][0] == "urlopen"
    assert {c[0] for c in network_calls[1:]} & {"snapshot_download", "list_repo_files"}


def test_an_unreachable_file_server_fails_after_one_short_probe(tmp_path, network_calls):
    from promptist_core.weights import REACHABILITY_TIMEOUT_S

    host = f"127.0.0.1:{closed_port()}"
    known = FileModel("head.pth", f"http://{host}/head.pth", "0" * 64)
    with pytest.raises(WeightsNotFoundError) as e:
        resolve_file("head", known=known, models_dir=tmp_path, allow_download=True)
    assert network_calls == [("urlopen", f"http://{host}/", REACHABILITY_TIMEOUT_S)]
    assert f"{host} cannot be reached" in str(e.value) and "PROMPTIST_OFFLINE=1" in str(e.value)
    assert str(tmp_path / "head.pth") in str(e.value)


def test_a_single_file_download_has_a_timeout(tmp_path, network_calls):
    from promptist_core.weights import DOWNLOAD_TIMEOUT_S

    source = tmp_path / "src.bin"
    source.write_bytes(b"weights")
    download_file(source.as_uri(), tmp_path / "w.bin")
    assert network_calls == [("urlopen", source.as_uri(), DOWNLOAD_TIMEOUT_S)]


def test_failed_download_still_says_where_to_put_the_files(tmp_path):
    # A real download attempt against a closed port: fails fast, like a machine without network.
    env = {k: v for k, v in os.environ.items() if k not in ("PROMPTIST_OFFLINE", "HF_HUB_OFFLINE",
                                                            "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="2",
               HF_HUB_DOWNLOAD_TIMEOUT="2")
    code = ("import sys; from promptist_core.weights import resolve\n"
            "try:\n    resolve('microsoft/Promptist', models_dir=sys.argv[1])\n"
            "except Exception as e:\n    print(type(e).__name__); print(e)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "models")], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert done.stdout.startswith("WeightsNotFoundError"), done.stdout + done.stderr
    assert "downloading it failed" in done.stdout
    assert str(tmp_path / "models" / "Promptist") in done.stdout
    assert not (tmp_path / "models" / "Promptist").exists()  # no empty folder left to look like a model


def test_short_gpt2_name_is_the_hub_id_the_hub_redirects_to(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="openai-community/gpt2"):
        resolve("gpt2", models_dir=tmp_path / "models", allow_download=False)
    folder = make_folder(tmp_path / "models" / "gpt2")
    assert resolve("gpt2", models_dir=tmp_path / "models", allow_download=False) == folder


def _hub_cache_entry(cache: Path, repo_id: str) -> Path:
    """A Hugging Face cache entry as huggingface_hub lays it out: refs/main -> snapshots/<commit>/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


@pytest.fixture
def clean_hf_env(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    return monkeypatch


def test_hub_cache_follows_where_the_host_points_it_at_call_time(tmp_path, clean_hf_env):
    """Forge sets HF_HUB_CACHE to models/diffusers at start-up, after huggingface_hub may be imported."""
    import huggingface_hub  # noqa: F401 - already imported: its constants were read before the host's change

    forge_cache = tmp_path / "forge" / "models" / "diffusers"
    snapshot = _hub_cache_entry(forge_cache, "someone/policy")
    clean_hf_env.setenv("HF_HUB_CACHE", str(forge_cache))
    assert resolve("someone/policy", models_dir=tmp_path / "none", allow_download=False) == snapshot


def test_hub_cache_also_searches_the_users_default_cache_when_the_host_points_elsewhere(tmp_path, clean_hf_env):
    snapshot = _hub_cache_entry(tmp_path / "user-cache" / "huggingface" / "hub", "someone/policy")
    clean_hf_env.setenv("HF_HUB_CACHE", str(tmp_path / "forge" / "models" / "diffusers"))
    assert resolve("someone/policy", models_dir=tmp_path / "none", allow_download=False) == snapshot
    with pytest.raises(WeightsNotFoundError) as e:
        resolve("someone/other", models_dir=tmp_path / "none", allow_download=False)
    assert str(tmp_path / "forge" / "models" / "diffusers" / "models--someone--other") in str(e.value)
    assert str(tmp_path / "user-cache" / "huggingface" / "hub" / "models--someone--other") in str(e.value)
