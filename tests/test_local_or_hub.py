"""A model's or adapter's name that can only be a local path, missing, is refused before the hub is asked
(`peftkit.local_or_hub`); a hub id still goes to the hub. Hub requests are observed on a local HTTP server that
huggingface_hub is pointed at."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants
from peft import LoraConfig

from peftkit.errors import PeftkitError
from peftkit.peft_format import CONFIG_NAME
from peftkit.recipe import load_recipe
from peftkit.train import train
from tests.conftest import cli_user_error, make_recipe, save_peft_lora


@pytest.fixture
def hub_requests(monkeypatch, tmp_path) -> list[str]:
    """The paths huggingface_hub asks of the hub, online, at a local server that answers 404 to each (no such
    repository: the client does not retry it), with an empty cache."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    yield asked
    server.shutdown()
    server.server_close()
    thread.join()


def test_a_missing_local_path_is_refused_before_the_hub_is_asked(tiny_llama, number_data, tmp_path, monkeypatch,
                                                                   capsys, hub_requests):
    """`--model runs/merged`, runs/ a directory here and runs/merged not: it went to the hub as a hub id, and offline
    huggingface_hub retried for ~20 s before the error (50 s seen for peftkit generate). Each flag and recipe key
    that takes a model or an adapter now says at once that there is no such directory and what is there, and an
    adapter's recorded base `runs/gone` is said to be gone, with no hub request; a hub id `user/name` is still asked
    of the hub, and offline still said as before."""
    (tmp_path / "runs" / "quick").mkdir(parents=True)
    (tmp_path / "runs" / "notes.txt").write_text("")
    monkeypatch.chdir(tmp_path)
    data = ["--data", str(number_data["eval"])]
    runs = ("(read as a local path, not a hub id: runs/ is a directory here and the local Hugging Face cache holds no "
            "such repository; download it there first for the hub's); runs/ holds notes.txt, quick/. Give a")
    for args, said in [
        (["generate", "--model", "runs/merged", "--prompt", "hi"], f"error: --model runs/merged: no such directory {runs}"
         " model's directory (config.json and weights), or a hub id user/name."),
        (["eval", "--model", str(tiny_llama), *data, "--adapter", "a=runs/a", "--adapter", "b=runs/b"],
         f"error: --adapter a=runs/a: no such directory {runs}n adapter's directory (adapter_config.json), a run "
         "directory, or a hub id user/name[@REV]."),
        (["eval", "--model", str(tiny_llama), *data, "--adapter", "a=./runs/a/", "--adapter", "b=a..b/c"],  # (no hub
         # id: "Adapter directory not found: runs/a", the name and flag dropped; a..b/c was suggested as a hub id)
         f"error: --adapter a=./runs/a/: no such directory; runs/ holds notes.txt, quick/. Give an adapter's"),
        (["eval", "--model", str(tiny_llama), *data, "--adapter", "b=a..b/c"],
         f"error: --adapter b=a..b/c: no such directory; {tmp_path}/ holds runs/. Give an adapter's"),
        (["eval", "--model", str(tiny_llama), *data, "--adapter", "runs/quick/adapter"],  # (a hub id's subfolder?)
         "error: --adapter runs/quick/adapter: no such directory; runs/quick/ is empty."),
        (["eval", *data, "--merged", "m=runs/merged", "--adapter", f"a={tmp_path}"],
         f"error: --merged m=runs/merged: no such directory {runs} merged model's directory"),
        (["merge", "--adapter", str(tmp_path), "--base", "runs/base", "--output", "o"],
         f"error: --base runs/base: no such directory {runs} model's directory"),
        (["inspect", "runs/adapter"], f"error: runs/adapter: no such directory {runs}n adapter's directory"),
        (["generate", "--model", "a/b/c", "--prompt", "hi"],  # (a model's hub id has one /)
         f"error: --model a/b/c: no such directory; {tmp_path}/ holds runs/. Give"),
        (["generate", "--model", "runs/notes.txt/m", "--prompt", "hi"],  # (a file on the way: said)
         "error: --model runs/notes.txt/m: no such directory; runs/ holds notes.txt, quick/; notes.txt there is a file, "
         "not a directory. Give"),
        (["generate", "--model", "/peftkit-no-such/m", "--prompt", "hi"],  # (the root named /, not //)
         "error: --model /peftkit-no-such/m: no such directory; / holds "),
        (["generate", "--model", "~peftkit-no-such-user/m", "--prompt", "hi"],  # (pathlib's bare RuntimeError before)
         "error: ~peftkit-no-such-user/m: there is no user 'peftkit-no-such-user' here, whose home directory "
         "~peftkit-no-such-user would be; give ~/peftkit-no-such-user/m for one in your own home directory, or the "
         "full path."),
    ]:
        err = " ".join(cli_user_error(monkeypatch, capsys, *args).split())
        assert said in err, err
    # A peft adapter whose recorded base (peft writes the path it loaded from) is gone.
    config = save_peft_lora(tiny_llama, tmp_path / "peft", LoraConfig(r=2, target_modules=["q_proj"])) / CONFIG_NAME
    config.write_text(config.read_text().replace(str(tiny_llama), "runs/gone"))
    for adapter in ("peft", "a=peft"):  # (evaluated alone; the base row of a comparison)
        err = " ".join(cli_user_error(monkeypatch, capsys, "eval", *data, "--adapter", adapter).split())
        assert (f"error: The base model runs/gone (base_model_name_or_path of {tmp_path / 'peft' / 'adapter_config.json'}"
                f", read from the current directory {tmp_path}) is not there: moved or deleted since? Give it with "
                "--model DIR.") in err, err
    recipe = make_recipe(tmp_path, Path("runs/merged"), number_data)  # (relative to the recipe's directory)
    with pytest.raises(PeftkitError) as e:
        train(load_recipe(recipe))
    assert str(e.value) == (f"model.name_or_path {tmp_path / 'runs' / 'merged'}: no such directory; {tmp_path}/runs/ "
                            "holds notes.txt, quick/. Give a local directory containing config.json, or a hub id such as "
                            "'meta-llama/Llama-3.2-1B'.")
    written = yaml.safe_load(recipe.read_text())
    written["model"]["name_or_path"], written["adapter"] = str(tiny_llama), {"init_from": "runs/quick/adapter"}
    recipe.write_text(yaml.safe_dump(written))
    with pytest.raises(PeftkitError) as e:
        load_recipe(recipe)
    assert f"recipe.yaml:2: adapter.init_from: Adapter runs/quick/adapter: no such directory ({tmp_path}/runs/quick/" \
           "adapter); runs/quick/ is empty. Give an adapter's directory (relative to the recipe's directory), or a " \
           "hub id user/name[@REV]." in str(e.value)
    assert hub_requests == []
    # A hub id is still a hub id: asked of the hub (the server sees it), and offline said from the cache as before.
    err = " ".join(cli_user_error(monkeypatch, capsys, "generate", "--model", "acme/tiny", "--prompt", "hi").split())
    assert "error: Could not load model acme/tiny" in err and hub_requests, err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    err = " ".join(cli_user_error(monkeypatch, capsys, "generate", "--model", "acme/tiny", "--prompt", "hi").split())
    assert (f"error: Could not load model acme/tiny: it is not in the local Hugging Face cache ({tmp_path / 'hf-cache'}), "
            "and HF_HUB_OFFLINE is set, so nothing is downloaded. Check the id, or unset HF_HUB_OFFLINE to download "
            "it.") in err, err
    # runs/ a directory here, but the cache holds a repository runs/merged (a hub layout mirrored locally, `user/`
    # holding clones): the hub's, from the cache.
    (tmp_path / "hf-cache" / "models--runs--merged" / "snapshots").mkdir(parents=True)
    err = " ".join(cli_user_error(monkeypatch, capsys, "generate", "--model", "runs/merged", "--prompt", "hi").split())
    assert "error: Could not load model runs/merged: " in err and "no such directory" not in err, err
    # A recipe's name is judged beside the recipe, not here: runs/other in a recipe elsewhere (no runs/ beside it) is
    # a hub id, asked of the hub, though runs/ is a directory here (it was refused as 'no such directory' by the
    # model's check at load, which read the rule against the current directory).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub_requests.clear()
    recipe = make_recipe(tmp_path / "elsewhere", Path("runs/other"), number_data)
    assert load_recipe(recipe).model.name_or_path == "runs/other"
    with pytest.raises(PeftkitError) as e:
        train(load_recipe(recipe))
    assert "Could not load model runs/other" in str(e.value) and "no such directory" not in str(e.value), e.value
    assert hub_requests


def test_a_missing_local_data_directory_is_refused_before_the_hub_is_asked(tiny_llama, number_data, tmp_path,
                                                                            monkeypatch, capsys, hub_requests):
    """A data name without a file's extension whose first part is a directory here (`data/numbers-saved`, a mistyped
    save_to_disk directory) went to the hub as a dataset id: 30 s of retries without network before 'Could not load
    dataset ... from the hub'. It is a missing local path now, said at once, in a recipe (beside it) and in --data;
    where the datasets cache holds a dataset of that name, it is the hub's again."""
    from datasets import config

    from peftkit.local_or_hub import meant_locally

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    recipe = make_recipe(tmp_path, tiny_llama, {"train": Path("data/numbers-saved"), "eval": number_data["eval"]})
    assert load_recipe(recipe).data.train == str(tmp_path / "data" / "numbers-saved")  # (a path, not a hub id)
    with pytest.raises(PeftkitError, match=f"^Data file not found: {tmp_path / 'data' / 'numbers-saved'}. Check "):
        train(load_recipe(recipe))
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", "--model", str(tiny_llama), "--data",
                                  "data/numbers-saved").split())
    assert ("error: --data data/numbers-saved: no such directory (read as a local path, not a hub id: data/ is a "
            "directory here and the local Hugging Face cache holds no such repository; download it there first for the "
            "hub's); data/ is empty. Give a data file (.json, .jsonl, .csv, .parquet, .txt), a directory datasets' "
            "save_to_disk wrote, or a hub dataset id user/name.") in err, err
    assert hub_requests == []
    monkeypatch.setattr(config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    (tmp_path / "datasets-cache" / "data___numbers-saved").mkdir(parents=True)
    assert not meant_locally("data/numbers-saved", kind="dataset") and meant_locally("data/numbers-saved")


def test_a_run_directory_given_as_adapter_is_its_adapter(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """`--adapter RUN_DIR` (eval, generate, chat, merge) was refused ("It is a training run's directory: its adapter
    is RUN_DIR/adapter"), though `eval RUN_DIR`, `generate RUN_DIR`, `inspect RUN_DIR` and `push RUN_DIR` take a run,
    and the missing-path error lists "a run directory" among what --adapter takes: it is the run's adapter/."""
    import sys

    from safetensors.torch import load_file

    from peftkit.cli import main

    run = tmp_path / "run"
    save_peft_lora(tiny_llama, run / "adapter", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    (run / "recipe.yaml").write_text("model: {name_or_path: x}\n")
    said = []
    for adapter in (run, run / "adapter"):
        for args in (["eval", "--model", str(tiny_llama), "--data", str(number_data["eval"])],
                     ["merge", "--output", str(tmp_path / f"merged-{adapter.name}")]):
            monkeypatch.setattr(sys, "argv", ["peftkit", *args, "--adapter", str(adapter)])
            main()
            said.append(capsys.readouterr().out.split("\n")[0])
    assert said[0] == said[2] and said[0].startswith("loss "), said
    merged = [load_file(tmp_path / f"merged-{name}" / "model.safetensors") for name in ("run", "adapter")]
    assert merged[0].keys() == merged[1].keys() and all(merged[0][k].equal(merged[1][k]) for k in merged[0])
