"""peftkit push against a fake Hugging Face Hub: an HTTP server on 127.0.0.1 answering the endpoints huggingface_hub's
own create_repo, repo_info, create_branch and upload_folder call (every file uploaded inline, `regular`, in the
commit's NDJSON), holding what it was sent. No network; HfApi is not patched, only pointed at the server."""

import base64
import json
import os
import shutil
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
import yaml
from huggingface_hub import constants

from peftkit.errors import PeftkitError
from peftkit.recipe import load_recipe
from peftkit.train import train
from tests.conftest import cli_user_error, free_port, make_recipe
from tests.test_hub import _publish_to

TOKEN = "hf_fake_write_token"


class FakeHub:
    """Model repositories by id: `private`, and each branch's files ({path: bytes}); the commits made (repo, branch,
    message, files); every request (method, path, Authorization). `refuse(status, ...)`: every request is answered
    with that error from then on. A request it does not know is kept in `unexpected` (and answered 400)."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str, str | None]] = []
        self.unexpected: list[str] = []
        self.refusal: tuple[int, dict[str, str]] | None = None
        self.endpoint = ""
        self.snapshots: dict[str, dict[str, bytes]] = {}
        """Each commit's files, by its id: what a download (`_resolve`) reads."""

    def refuse(self, status: int, code: str | None = None, message: str | None = None) -> None:
        self.refusal = status, {k: v for k, v in (("X-Error-Code", code), ("X-Error-Message", message)) if v}

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict, dict[str, str]]:
        """(status, JSON reply, headers) for one request."""
        if self.refusal is not None:
            return self.refusal[0], {"error": self.refusal[1].get("X-Error-Message", "refused")}, self.refusal[1]
        parts = [unquote(p) for p in path.split("/")]  # /api/models/USER/NAME/ACTION/REVISION
        if method in ("GET", "HEAD") and len(parts) > 5 and parts[3] == "resolve":  # /USER/NAME/resolve/COMMIT/FILE
            return self._resolve(parts[4], "/".join(parts[5:]))
        if (method, path) == ("POST", "/api/repos/create"):
            asked = json.loads(body)
            repo_id = f"{asked['organization']}/{asked['name']}"
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}, {}
            self.repos[repo_id] = {"private": asked.get("visibility") == "private", "asked": asked,
                                   "branches": {"main": {}}}
            return 200, {"url": f"{self.endpoint}/{repo_id}"}, {}
        if (method, path) == ("POST", "/api/validate-yaml"):
            try:  # the card's front matter, as the Hub checks it before a commit
                yaml.safe_load(json.loads(body)["content"].split("---")[1])
            except yaml.YAMLError:
                return 400, {"errors": [{"message": "Invalid YAML in the metadata"}]}, {}
            return 200, {"errors": [], "warnings": []}, {}
        if (method, path) == ("GET", "/api/agent-harnesses"):  # the client's telemetry (once a process); none here
            return 404, {"error": "none"}, {}
        if len(parts) < 5 or parts[:3] != ["", "api", "models"]:
            return self._unexpected(method, path)
        repo = self.repos.get(f"{parts[3]}/{parts[4]}")
        if repo is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        action, revision = (parts[5], "/".join(parts[6:])) if len(parts) > 6 else (None, None)
        if method == "GET" and action in (None, "revision"):
            head = repo.get("heads", {}).get(revision or "main", "0" * 40)  # (the branch's last commit)
            return 200, {"id": f"{parts[3]}/{parts[4]}", "private": repo["private"], "sha": head}, {}
        if method == "GET" and action == "tree" and revision in self.snapshots:  # a download's listing, at a commit
            return 200, [{"type": "file", "path": name, "size": len(data), "oid": "0" * 40}
                         for name, data in self.snapshots[revision].items()], {}
        if method == "POST" and action == "branch":
            if revision in repo["branches"]:
                return 409, {"error": "Reference already exists"}, {}
            repo["branches"][revision] = dict(repo["branches"][json.loads(body).get("startingPoint", "main")])
            return 200, {}, {}
        if revision not in repo["branches"]:
            return 404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"}
        if method == "GET" and action == "tree":  # list_repo_files: every file, one page
            return 200, [{"type": "file", "path": name, "size": len(data), "oid": "0" * 40}
                         for name, data in repo["branches"][revision].items()], {}
        if method == "POST" and action == "preupload":
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in json.loads(body)["files"]]}, {}
        if method == "POST" and action == "commit":
            return self._commit(f"{parts[3]}/{parts[4]}", revision, body)
        return self._unexpected(method, path)

    def _commit(self, repo_id: str, revision: str, body: bytes) -> tuple[int, dict, dict[str, str]]:
        lines = [json.loads(line) for line in body.splitlines()]
        assert lines[0]["key"] == "header" and {line["key"] for line in lines[1:]} <= {"file", "deletedFile"}, lines
        deleted = [f["value"]["path"] for f in lines[1:] if f["key"] == "deletedFile"]
        files = {f["value"]["path"]: base64.b64decode(f["value"]["content"]) for f in lines[1:] if f["key"] == "file"}
        assert all(f["value"]["encoding"] == "base64" for f in lines[1:] if f["key"] == "file")
        branch = self.repos[repo_id]["branches"][revision]
        for name in deleted:
            del branch[name]
        branch.update(files)
        oid = f"{len(self.commits) + 1:040x}"
        self.snapshots[oid] = dict(branch)
        self.repos[repo_id].setdefault("heads", {})[revision] = oid
        self.commits.append({"repo": repo_id, "branch": revision, "message": lines[0]["value"]["summary"],
                             "files": files, "deleted": deleted})
        return 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid}, {}

    def _resolve(self, commit: str, name: str) -> tuple[int, bytes, dict[str, str]]:
        """A file of a commit, as huggingface_hub's download reads it (its HEAD: the commit, an ETag, the size)."""
        import hashlib

        data = self.snapshots.get(commit, {}).get(name)
        if data is None:
            return 404, b"{}", {"X-Error-Code": "EntryNotFound"}
        return 200, data, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}

    def _unexpected(self, method: str, path: str) -> tuple[int, dict, dict[str, str]]:
        self.unexpected.append(f"{method} {path}")
        return 400, {"error": "not a fake hub endpoint"}, {}

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = urlparse(self.path).path
                hub.requests.append((self.command, path, self.headers.get("Authorization")))
                status, reply, headers = hub.answer(self.command, path, body)
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(status)
                kind = "application/octet-stream" if isinstance(reply, bytes) else "application/json"
                for key, value in {"Content-Type": kind, **headers}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_HEAD = _reply

            def log_message(self, *args) -> None:  # quiet
                pass

        return Handler


@pytest.fixture
def fake_hub(monkeypatch) -> FakeHub:
    """A FakeHub serving on 127.0.0.1, huggingface_hub pointed at it (HfApi() reads constants.ENDPOINT when made; a
    download, the URL template made from it at import), online, with a token in HF_TOKEN (read at each request)."""
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), hub.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield hub
    server.shutdown()
    server.server_close()
    thread.join()


def _run(tmp_path: Path, model: Path, data: dict, save_steps: int | None = None, **export) -> Path:
    training = {"max_steps": 2} | ({"save_steps": save_steps} if save_steps else {})
    train(load_recipe(make_recipe(tmp_path, model, data, training=training, export=export)))
    return tmp_path / "run"


def _said(*args: str) -> str:
    from typer.testing import CliRunner

    from peftkit.cli import app

    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _offline_cache(monkeypatch, tmp_path: Path, repo_id: str, files: dict[str, bytes], commit: str) -> Path:
    """What `repo_id` received, in an offline Hugging Face cache as `commit` of its main, as a download leaves it."""
    received = tmp_path / f"received-{commit[:4]}"
    received.mkdir()
    for name, data in files.items():
        (received / name).write_bytes(data)
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _publish_to(cache, repo_id, received, commit)
    return cache


def test_a_runs_adapter_is_pushed_whole_and_reads_back_as_the_local_one(fake_hub, tiny_llama, number_data, tmp_path,
                                                                         monkeypatch):
    """`peftkit push RUN user/name --private --revision dev --message M`: the repository is made private, branch dev
    made from main, and one commit there holds adapter/'s files byte for byte (the model card among them) and nothing
    of the run's checkpoints, data or logs; it says each file and the commit's URL. Read back from the Hub cache,
    `--adapter user/name@dev` generates and evaluates as the run's adapter/ does, and peft loads it to the same
    logits. A second push of the adapter directory itself goes to the existing repository's main."""
    run = _run(tmp_path, tiny_llama, number_data)
    adapter = run / "adapter"
    said = _said("push", str(run), "acme/tiny-lora", "--private", "--revision", "dev", "--message", "first adapter")
    expected = _files(adapter)
    assert {"adapter_config.json", "adapter_model.safetensors", "peftkit.json", "README.md"} <= expected.keys()
    assert said.splitlines() == [f"pushed {name}" for name in sorted(expected)] + [
        f"commit {fake_hub.endpoint}/acme/tiny-lora/commit/{1:040x}"]
    assert fake_hub.repos["acme/tiny-lora"]["private"] is True
    [commit] = fake_hub.commits
    assert (commit["repo"], commit["branch"], commit["message"]) == ("acme/tiny-lora", "dev", "first adapter")
    assert commit["files"] == expected  # byte for byte, and nothing else
    assert fake_hub.repos["acme/tiny-lora"]["branches"]["main"] == {}
    assert ("POST", "/api/models/acme/tiny-lora/branch/dev", f"Bearer {TOKEN}") in fake_hub.requests
    assert {auth for _, path, auth in fake_hub.requests if path != "/api/agent-harnesses"} == {f"Bearer {TOKEN}"}
    assert fake_hub.unexpected == []

    (adapter / ".adapter_model.safetensors.x1y2.tmp").write_bytes(b"an interrupted write")
    said = _said("push", str(adapter), "acme/tiny-lora")
    assert fake_hub.commits[1]["branch"] == "main" and fake_hub.commits[1]["files"] == expected
    assert fake_hub.commits[1]["message"].startswith("Upload adapter with peftkit ")
    assert "tmp" not in said and fake_hub.unexpected == []
    assert fake_hub.repos["acme/tiny-lora"]["private"] is True  # (the existing repository: 409, kept)

    cache = _offline_cache(monkeypatch, tmp_path, "acme/tiny-lora", commit["files"], "d" * 40)
    (cache / "models--acme--tiny-lora" / "refs" / "dev").write_text("d" * 40)
    prompt = ["generate", "--model", str(tiny_llama), "--prompt", "1 plus 2", "--max-new-tokens", "5"]
    assert _said(*prompt, "--adapter", "acme/tiny-lora@dev") == _said(*prompt, "--adapter", str(adapter))
    data = ["--model", str(tiny_llama), "--data", str(number_data["eval"])]
    assert _said("eval", *data, "--adapter", "acme/tiny-lora@dev") == _said("eval", *data, "--adapter", str(adapter))

    # peft imported offline: online, its import of bitsandbytes asks the Hub for a kernel
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftkit.adapter_base import load_adapted_model

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        plain = base.eval()(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(base, "acme/tiny-lora", revision="dev").eval()(input_ids=ids).logits
        ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0].eval()(input_ids=ids).logits
    assert (theirs - ours).abs().max() <= 1e-5 and (ours - plain).abs().max() > 1e-4


def test_merged_pushes_the_runs_merged_model(fake_hub, tiny_llama, number_data, tmp_path, monkeypatch):
    """--merged: the run's merged/ byte for byte, to main of a repository made with the owner's default visibility
    (no --private: none asked); read back, `--model user/name` generates as the local merged/ does."""
    run = _run(tmp_path, tiny_llama, number_data, merged=True)
    _said("push", str(run), "acme/tiny-merged", "--merged")
    [commit] = fake_hub.commits
    assert (commit["repo"], commit["branch"]) == ("acme/tiny-merged", "main")
    assert commit["files"] == _files(run / "merged") and "model.safetensors" in commit["files"]
    assert commit["message"].startswith("Upload merged model with peftkit ")
    assert "visibility" not in fake_hub.repos["acme/tiny-merged"]["asked"]
    assert not any("branch" in path for _, path, _ in fake_hub.requests) and fake_hub.unexpected == []

    _offline_cache(monkeypatch, tmp_path, "acme/tiny-merged", commit["files"], "e" * 40)
    prompt = ["generate", "--prompt", "1 plus 2", "--max-new-tokens", "5"]
    assert _said(*prompt, "--model", "acme/tiny-merged") == _said(*prompt, "--model", str(run / "merged"))


def test_a_push_leaves_no_file_of_an_earlier_push_the_directory_lacks(fake_hub, tiny_llama, number_data, tmp_path,
                                                                       monkeypatch, capsys):
    """A second push into a repository kept the files of the first that the new directory lacks: an adapter
    trained with data.chat_template, then one without, left the old chat_template.jinja beside the new weights, and
    `--adapter user/name` used it in place of the base's template. Such top-level files a loader reads that the
    directory lacks are refused (nothing committed), and deleted in the same commit (and said) with --overwrite;
    the others (.gitattributes, a licence, an image) and the files of a subfolder the push does not write (another
    adapter's) stay. A subfolder it does write (an X-LoRA export's copy of an expert, `0/`) is an adapter too: its
    loader files the directory lacks were kept (the subfolders were not looked at)."""
    adapter = _run(tmp_path, tiny_llama, number_data) / "adapter"
    (adapter / "0").mkdir()
    (adapter / "0" / "adapter_config.json").write_text("{}")
    first = Path(shutil.copytree(adapter, tmp_path / "first"))
    (first / "chat_template.jinja").write_text("{{ messages[0].content }}")
    (first / "0" / "chat_template.jinja").write_text("{{ messages[0].content }}")
    _said("push", str(first), "acme/tiny-lora")
    main = fake_hub.repos["acme/tiny-lora"]["branches"]["main"]
    kept = {".gitattributes": b"*.safetensors filter=lfs", "other/adapter_config.json": b"{}", "LICENSE": b"MIT",
            "plot.png": b"a picture"}
    main |= kept
    refused = " ".join(cli_user_error(monkeypatch, capsys, "push", str(adapter), "acme/tiny-lora").split())
    assert ("acme/tiny-lora (main) holds 0/chat_template.jinja, chat_template.jinja, which " in refused and "nothing "
            "was committed. Push with --overwrite to delete them in the same commit" in refused)
    assert len(fake_hub.commits) == 1
    said = _said("push", str(adapter), "acme/tiny-lora", "--overwrite")
    assert "deleted chat_template.jinja" in said.splitlines()
    assert sorted(fake_hub.commits[1]["deleted"]) == ["0/chat_template.jinja", "chat_template.jinja"]
    assert main == _pushed_files(adapter) | kept
    assert fake_hub.unexpected == []


def test_an_unfinished_runs_adapter_is_pushed_with_a_warning(tiny_llama, number_data, tmp_path):
    """A run without manifest.json (unfinished, or stopped while it made its end again) holds the adapter/ it
    exported last: push says so, as eval and generate of that run do (what is pushed is not the run's end)."""
    from peftkit.errors import PeftkitWarning
    from peftkit.push import push_folder

    run = _run(tmp_path, tiny_llama, number_data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftkitWarning)
        assert push_folder(run, merged=False) == (run / "adapter", "adapter")
    (run / "manifest.json").unlink()
    with pytest.warns(PeftkitWarning, match=r"has no manifest.json: the run has not finished .* the adapter/ it "
                                            r"exported last\. `peftkit train RECIPE --resume` finishes it"):
        assert push_folder(run, merged=False) == (run / "adapter", "adapter")


def test_what_cannot_be_pushed_is_said_before_anything_is_sent(fake_hub, tiny_llama, number_data, tmp_path,
                                                               monkeypatch, capsys):
    """A path that is no run, adapter or model directory (a checkpoint with a word on it), a run without the entry
    asked for, --merged of an adapter, a link out of the directory, a repository id that is not user/name, offline,
    no token: each an `error:` naming what to do, and no request reaches the Hub."""
    run = _run(tmp_path / "merged-only", tiny_llama, number_data, adapter=False, merged=True)
    adapter = _run(tmp_path / "adapter-only", tiny_llama, number_data, save_steps=2) / "adapter"
    linked = Path(shutil.copytree(adapter, tmp_path / "linked"))
    os.symlink(number_data["train"], linked / "train.jsonl")
    (tmp_path / "empty").mkdir()

    def error(*args: str) -> str:
        return " ".join(cli_user_error(monkeypatch, capsys, "push", *args).split())

    assert f"{tmp_path / 'nowhere'}: no such directory. Give a run directory" in error(str(tmp_path / "nowhere"), "a/b")
    assert "is no run, adapter or model directory" in error(str(tmp_path / "empty"), "a/b")
    checkpoint = adapter.parent / "checkpoints" / "step-00000002"
    assert "It is a training checkpoint (optimizer state, not for the Hub)" in error(str(checkpoint), "a/b")
    said = error(str(run), "acme/x")
    assert f"{run} is a run directory holding no adapter/ to push (export.adapter: false" in said
    assert "its merged/ is pushed with --merged" in said
    assert (f"holding no merged/ to push (export.merged: true exports one; `peftkit merge --adapter {adapter} --output "
            "DIR` makes one)") in error(str(adapter.parent), "acme/x", "--merged")
    assert "is an adapter directory, and --merged pushes a run's merged/" in error(str(adapter), "acme/x", "--merged")
    assert f"links to {number_data['train'].resolve()}, outside {linked}" in error(str(linked), "acme/x")
    os.unlink(linked / "train.jsonl")
    os.symlink(adapter.parent / "checkpoints", linked / "checkpoints")  # a directory's files: never listed
    assert (f"{linked / 'checkpoints'} links to the directory {(adapter.parent / 'checkpoints').resolve()}, whose files "
            "would not be pushed") in error(str(linked), "acme/x")
    assert "'tiny-lora' is no Hub repository id: give user/name" in error(str(adapter), "tiny-lora")
    assert "'acme/tiny--lora' is no Hub repository id (" in error(str(adapter), "acme/tiny--lora")
    assert "'acme/a/b' is no Hub repository id: give user/name" in error(str(adapter), "acme/a/b")
    assert (f"--revision {'a1' * 20} is a commit id, and a push makes a commit on a branch: give the branch's name "
            "(created from main where absent)") in error(str(adapter), "acme/x", "--revision", "a1" * 20)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set, so nothing is sent to the Hub: unset it" in error(str(adapter), "acme/x")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert ("Pushing to acme/x needs a Hugging Face token with write access, and none is set: log in with `hf auth "
            "login`, or set HF_TOKEN.") in error(str(adapter), "acme/x")
    assert fake_hub.requests == []


def test_the_hubs_refusals_are_said_with_the_repository_and_the_fix(fake_hub, tiny_llama, number_data, tmp_path,
                                                                    monkeypatch, capsys):
    """The Hub answering 401 (a bad token), 403 (no write access to the owner), 404 (no such repository), a Hub that
    cannot be reached, and --private into an existing public repository: an `error:` naming the repository and what
    to do, no traceback, and nothing committed."""
    adapter = _run(tmp_path, tiny_llama, number_data) / "adapter"

    def error(*args: str) -> str:
        return " ".join(cli_user_error(monkeypatch, capsys, "push", str(adapter), *args).split())

    fake_hub.refuse(401, message="Invalid credentials in Authorization header")
    said = error("acme/x")
    assert said.startswith(f"error: Could not push {adapter} to acme/x: the Hub refused the token (401: invalid or "
                           "expired) (the Hub said: Invalid credentials in Authorization header); log in with `hf auth "
                           "login`, or set HF_TOKEN to a token with write access."), said
    fake_hub.refuse(403, message="You don't have the rights to create a model under the namespace \"acme\"")
    said = error("acme/x")
    assert "to acme/x: the token may not write to acme (403) (the Hub said: You don't have the rights" in said
    fake_hub.refuse(404, code="RepoNotFound")
    assert "to acme/x: the Hub found no repository acme/x that this token may write to (404)" in error("acme/x")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    said = error("acme/x")
    assert f"to acme/x: the Hub at {constants.ENDPOINT} could not be reached (ConnectError" in said, said
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.endpoint)

    fake_hub.refusal = None
    carded = Path(shutil.copytree(adapter, tmp_path / "carded"))
    (carded / "README.md").write_text("---\ntags: [peftkit\n---\n# my edit\n")
    said = " ".join(cli_user_error(monkeypatch, capsys, "push", str(carded), "acme/x").split())
    assert f"Could not push {carded} to acme/x: Invalid metadata in README.md. - Invalid YAML in the metadata" in said
    _said("push", str(adapter), "acme/public")
    said = error("acme/public", "--private")
    assert "acme/public exists and is public, and --private was asked: nothing was pushed." in said
    assert len(fake_hub.commits) == 1 and fake_hub.unexpected == []


def _push_recipe(tmp_path: Path, model: Path, data: dict, repo_id: str = "acme/tiny-lora") -> Path:
    return make_recipe(tmp_path, model, data, training={"max_steps": 2}, export={"push_to_hub": repo_id})


def test_export_push_to_hub_pushes_the_adapter_at_the_end_and_verify_does_not(fake_hub, tiny_llama, number_data,
                                                                              tmp_path, capsys):
    """export.push_to_hub: user/name pushes the finished run's adapter/ byte for byte in one commit to main, and says
    the commit; `peftkit verify` of that run re-runs it without pushing (the Hub sees no second commit), and passes."""
    from rich.console import Console

    from peftkit.verify import verify

    train(load_recipe(_push_recipe(tmp_path, tiny_llama, number_data)))
    run = tmp_path / "run"
    [commit] = fake_hub.commits
    assert (commit["repo"], commit["branch"]) == ("acme/tiny-lora", "main")
    assert commit["files"] == _files(run / "adapter") and "adapter_model.safetensors" in commit["files"]
    said = " ".join(capsys.readouterr().out.split())
    assert f"export.push_to_hub: pushed {len(commit['files'])} files of {run / 'adapter'} to acme/tiny-lora: " in said
    assert fake_hub.unexpected == []
    assert json.loads((run / "manifest.json").read_text())["pushed_to_hub"] == {
        "repo": "acme/tiny-lora", "revision": "main", "commit": f"{1:040x}",
        "url": f"{fake_hub.endpoint}/acme/tiny-lora/commit/{1:040x}"}
    requests = len(fake_hub.requests)
    assert verify(run, console=Console(quiet=True)).ok
    assert len(fake_hub.commits) == 1 and len(fake_hub.requests) == requests


def test_export_push_private_and_push_revision_push_as_peftkit_push_s_flags(fake_hub, tiny_llama, number_data,
                                                                            tmp_path, monkeypatch, capsys):
    """export.push_private and export.push_revision are `peftkit push`'s --private and --revision: the repository is
    created private, the commit made on that branch (created from main), and manifest.json records the push; verify
    re-runs without pushing. A push that fails says the `peftkit push` command with those flags."""
    from rich.console import Console

    from peftkit.push import push_run
    from peftkit.verify import verify

    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 2},
                         export={"push_to_hub": "acme/tiny-lora", "push_private": True, "push_revision": "v1"})
    train(load_recipe(recipe))
    run = tmp_path / "run"
    [commit] = fake_hub.commits
    assert (commit["repo"], commit["branch"]) == ("acme/tiny-lora", "v1") and fake_hub.repos["acme/tiny-lora"]["private"]
    assert commit["files"] == _files(run / "adapter")
    assert json.loads((run / "manifest.json").read_text())["pushed_to_hub"] == {
        "repo": "acme/tiny-lora", "revision": "v1", "commit": f"{1:040x}",
        "url": f"{fake_hub.endpoint}/acme/tiny-lora/commit/{1:040x}"}
    requests = len(fake_hub.requests)
    assert verify(run, console=Console(quiet=True)).ok
    assert len(fake_hub.commits) == 1 and len(fake_hub.requests) == requests and fake_hub.unexpected == []
    fake_hub.refuse(403)
    with pytest.raises(PeftkitError) as e:
        push_run(run, load_recipe(recipe).export, Console(quiet=True))
    assert f"Push it again with `peftkit push {run} acme/tiny-lora --revision v1 --private`." in str(e.value)
    assert json.loads((run / "manifest.json").read_text())["pushed_to_hub"]["commit"] == f"{1:040x}"


def test_a_recipe_that_could_push_nothing_is_refused_before_training(fake_hub, tiny_llama, number_data, tmp_path,
                                                                     monkeypatch, capsys):
    """export.push_to_hub that is no user/name (a recipe error at its line) or without export.adapter, offline, or
    without a token: `error:`
    before anything trains (no run directory) or reaches the Hub."""
    def error(repo_id: str = "acme/tiny-lora") -> str:
        recipe = _push_recipe(tmp_path, tiny_llama, number_data, repo_id)
        return " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())

    recipe_file = tmp_path / "recipe.yaml"
    said = error("tiny-lora")
    assert (f"{recipe_file}:" in said and "'export.push_to_hub' = 'tiny-lora': 'tiny-lora' is no Hub repository id: "
            "give user/name") in said, said
    assert "'acme/tiny--lora' is no Hub repository id (Cannot have -- or .. in repo_id" in error("acme/tiny--lora")
    no_adapter = make_recipe(tmp_path, tiny_llama, number_data, export={"push_to_hub": "acme/x", "adapter": False})
    assert ("export.push_to_hub pushes the run's adapter/, and export.adapter is false: set it true (merged/ is pushed "
            "by `peftkit push RUN_DIR acme/x --merged`)") in " ".join(
                cli_user_error(monkeypatch, capsys, "train", str(no_adapter)).split())
    for export, key in (({"push_revision": "v1"}, "export.push_revision 'v1'"),
                        ({"push_private": True}, "export.push_private: true")):
        unpushed = make_recipe(tmp_path, tiny_llama, number_data, export=export)
        assert (f"{key} is how export.push_to_hub pushes, and export.push_to_hub is not set: set it (user/name), "
                "or remove") in " ".join(cli_user_error(monkeypatch, capsys, "train", str(unpushed)).split())
    commit = make_recipe(tmp_path, tiny_llama, number_data, export={"push_to_hub": "acme/x", "push_revision": "a" * 40})
    assert (f"export.push_revision {'a' * 40} is a commit id, and a push makes a commit on a branch: give the branch's "
            "name") in " ".join(cli_user_error(monkeypatch, capsys, "train", str(commit)).split())
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    said = error()
    assert ("export.push_to_hub: HF_HUB_OFFLINE is set, so the run's adapter could not be pushed to acme/tiny-lora at "
            "its end; nothing was trained. Unset it, or remove export.push_to_hub and push the finished run with "
            f"`peftkit push {tmp_path / 'run'} acme/tiny-lora`") in said, said
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert ("export.push_to_hub: pushing to acme/tiny-lora needs a Hugging Face token with write access, and none is "
            "set; nothing was trained. Log in with `hf auth login`, or set HF_TOKEN") in error()
    assert not (tmp_path / "run").exists() and fake_hub.requests == []


def test_a_push_that_fails_at_the_end_keeps_the_run_and_says_how_to_push_again(fake_hub, tiny_llama, number_data,
                                                                               tmp_path, monkeypatch, capsys):
    """The Hub refusing the push at the run's end (403): the run's adapter/ and manifest.json stay, and the error
    (exit 2) names the run directory, the Hub's refusal and the `peftkit push` command that pushes it again."""
    recipe = _push_recipe(tmp_path, tiny_llama, number_data)
    fake_hub.refuse(403, message="You don't have the rights to create a model under the namespace \"acme\"")
    said = " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())
    run = tmp_path / "run"
    assert (f"The run finished and its files are in {run}, but export.push_to_hub failed: Could not push "
            f"{run / 'adapter'} to acme/tiny-lora: the token may not write to acme (403)") in said, said
    assert f"Push it again with `peftkit push {run} acme/tiny-lora`." in said
    assert (run / "manifest.json").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert fake_hub.commits == []
    fake_hub.refusal = None
    _said("push", str(run), "acme/tiny-lora")  # as the error says
    assert fake_hub.commits[0]["files"] == _files(run / "adapter")


@pytest.mark.parametrize("failure", ["read-only", "disk full"])
def test_a_push_manifest_json_cannot_record_says_it_was_pushed_with_the_record(fake_hub, tiny_llama, number_data,
                                                                               tmp_path, failure):
    """The push at the run's end succeeds and manifest.json cannot be rewritten (a read-only file system: the OSError
    itself; a full disk: fileio's DiskFullError): the commit is said on the console first, and the error says the push
    was made (repository, branch, commit, URL), why manifest.json could not take it, that nothing is lost, and holds
    the record exactly as manifest.json would have; manifest.json stays byte for byte as the run wrote it."""
    import errno

    from rich.console import Console

    import peftkit.fileio
    from peftkit.fileio import DiskFullError
    from peftkit.push import push_run

    export = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 2},
                                     export={"push_to_hub": "acme/tiny-lora", "push_revision": "v1"})).export
    train(load_recipe(make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 2})))  # (not pushed)
    run = tmp_path / "run"
    before = (run / "manifest.json").read_bytes()

    def refuse(path, obj) -> None:
        if failure == "read-only":
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        raise DiskFullError(f"No space left on the device while writing {path}. The previous version of it, if any, "
                            "is intact; free some disk space, or write somewhere else.")

    console = Console(record=True, width=400)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(peftkit.fileio, "atomic_write_json", refuse)
        with pytest.raises(PeftkitError) as e:
            push_run(run, export, console)
    [commit] = fake_hub.commits
    assert commit["files"] == _files(run / "adapter") and commit["branch"] == "v1"
    url = f"{fake_hub.endpoint}/acme/tiny-lora/commit/{1:040x}"
    assert f"pushed {len(commit['files'])} files of {run / 'adapter'} to acme/tiny-lora (v1): {url}" in \
        console.export_text()
    why = ("OSError: [Errno 30] Read-only file system: " + repr(str(run / "manifest.json")) + "." if failure ==
           "read-only" else f"No space left on the device while writing {run / 'manifest.json'}.")
    said = str(e.value)
    assert said.startswith(f"export.push_to_hub pushed the run's adapter/ to acme/tiny-lora (v1): commit {1:040x}, "
                           f"{url}. But {run / 'manifest.json'} could not record the push: {why}"), said
    assert (f"It is unchanged, and nothing of the run in {run} is lost; the push need not be made again. The record "
            "manifest.json lacks (keep it, or add it there as its key): \"pushed_to_hub\": ") in said
    record = json.loads(said.split('"pushed_to_hub": ', 1)[1])
    assert record == {"repo": "acme/tiny-lora", "revision": "v1", "commit": f"{1:040x}", "url": url}
    assert (run / "manifest.json").read_bytes() == before
    push_run(run, export, Console(quiet=True))  # writable again: the record is what it would be
    assert json.loads((run / "manifest.json").read_text())["pushed_to_hub"] == record | {"commit": f"{2:040x}",
                                                                                         "url": url[:-40] + f"{2:040x}"}



def _pushed_files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by its path relative to it (subdirectories' too), as a push sends them."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _pushed_and_fetched(fake_hub: FakeHub, run: Path, repo_id: str, tiny_llama: Path, tmp_path: Path,
                        monkeypatch) -> dict[str, bytes]:
    """Push `run`, check the commit is its adapter/ whole (subdirectories too), fetch `repo_id` as `--adapter` does
    into an empty cache, check it loads there with the run's logits bit for bit (offline from then on); the files
    pushed."""
    from peftkit.adapter_base import load_adapted_model
    from peftkit.hub import hub_adapter

    said = _said("push", str(run), repo_id)
    expected = _pushed_files(run / "adapter")
    assert fake_hub.commits[-1]["files"] == expected
    assert said.splitlines()[:-1] == [f"pushed {name}" for name in expected]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # empty: fetched from the fake Hub
    snapshot = Path(hub_adapter(repo_id))
    assert _pushed_files(snapshot) == {name: data for name, data in expected.items()
                                       if not name.endswith("README.md")}  # (the cards are not read)
    assert not [r for r in fake_hub.unexpected if repo_id in r]  # (bitsandbytes' import online asks for kernels)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        ours = load_adapted_model(str(tiny_llama), str(run / "adapter"), torch.device("cpu"))[0].eval()
        fetched = load_adapted_model(str(tiny_llama), str(snapshot), torch.device("cpu"))[0].eval()
        assert torch.equal(fetched(input_ids=ids).logits, ours(input_ids=ids).logits)
    return expected


def test_an_x_lora_run_is_pushed_with_its_experts_and_reads_back_from_the_hub(fake_hub, tiny_llama, number_data,
                                                                               tmp_path, monkeypatch):
    """An X-LoRA run's adapter/ holds a copy of each expert (0/, 1/): `peftkit push` sends them with the classifier,
    byte for byte, and what `--adapter user/name` fetches from the Hub into an empty cache is the pushed files (the
    model cards aside), which load with the run's logits bit for bit and evaluate and generate as its adapter/.
    Before, the fetch took the top level's adapter files only (`hub.ADAPTER_FILES`), and the experts' copies were
    missing (0/ and 1/ were not fetched: the files compared differ)."""
    from peft import LoraConfig as PeftLoraConfig

    from tests.conftest import method_recipe, save_peft_lora

    experts = {"0": str(save_peft_lora(tiny_llama, tmp_path / "experts" / "0", PeftLoraConfig(
                   r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))),
               "1": str(save_peft_lora(tiny_llama, tmp_path / "experts" / "1", PeftLoraConfig(
                   r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"]), seed=1))}
    train(load_recipe(method_recipe(tmp_path, tiny_llama, number_data, {"method": "xlora", "adapters": experts},
                                    training={"max_steps": 2, "lr": 5e-2})))
    pushed = _pushed_and_fetched(fake_hub, tmp_path / "run", "acme/tiny-xlora", tiny_llama, tmp_path, monkeypatch)
    assert {"0/adapter_config.json", "0/adapter_model.safetensors", "1/adapter_model.safetensors"} <= pushed.keys()
    adapter = tmp_path / "run" / "adapter"
    data = ["--model", str(tiny_llama), "--data", str(number_data["eval"])]
    assert _said("eval", *data, "--adapter", "acme/tiny-xlora") == _said("eval", *data, "--adapter", str(adapter))
    prompt = ["generate", "--model", str(tiny_llama), "--prompt", "1 plus 2", "--max-new-tokens", "3"]
    assert _said(*prompt, "--adapter", "acme/tiny-xlora") == _said(*prompt, "--adapter", str(adapter))


def test_an_adapter_fusion_run_is_pushed_whole_and_reads_back_from_the_hub(fake_hub, tiny_llama, number_data,
                                                                           tmp_path, monkeypatch):
    """An AdapterFusion run's adapter/ holds the fused adapters' tensors and configs in its own files (no directory of
    theirs): pushed, and fetched into an empty cache, it loads with the run's logits bit for bit. Passes on the code as
    it was (checked)."""
    from peftkit.methods.lora import LoraConfig
    from tests.conftest import save_random_adapter

    fuse = [str(save_random_adapter(tiny_llama, LoraConfig(r=2, alpha=4, target_modules=targets), tmp_path / name,
                                    seed)) for name, targets, seed in (("a", ["q_proj", "v_proj"], 1),
                                                                       ("b", ["v_proj", "o_proj"], 2))]
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 2})
    raw = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump(raw | {"adapter": {"method": "fusion", "fuse": fuse}}, sort_keys=False))
    train(load_recipe(recipe))
    pushed = _pushed_and_fetched(fake_hub, tmp_path / "run", "acme/tiny-fusion", tiny_llama, tmp_path, monkeypatch)
    assert sorted(pushed) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "peftkit.json"]
