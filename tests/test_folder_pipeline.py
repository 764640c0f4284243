"""A folder of the user's own images, end to end through ``mlflow run``: scikit-learn's digits written
as 32x32 colour images with a natural long tail (tests/datasets.py), once as PNG class folders and once
as JPEG files under ImageNet-LT-style list files.

* ``mlflow run . -P dataset=... -P data_dir=...`` runs every stage, FINISHED, and registers a champion;
* the champion, served by ``mlflow models serve``, answers a base64 PNG taken from the folder as it
  answers that image's pixels decoded as training decodes them;
* the same command again reuses every stage; after a changed image the splits stage runs again (and
  so would every stage after it, as each reads the run before it).
"""

from __future__ import annotations

import base64
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from argse.data.stream import read_image
from conftest import REPO, free_port, post_json, subprocess_env, wait_for_http
from argse.testing.image_folders import write_image_folder

STEPS = ("splits", "experts", "gating-pretrain", "gating-selective", "argse", "evaluate")
TINY = ("-P", "epochs=1", "-P", "batch_size=32", "-P", "gating_epochs=2", "-P", "selective_rounds=1",
        "-P", "eg_rounds=2", "-P", "n_boot=5", "-P", "coverage_grid=1,0.8,0.6")


def mlflow_run(store: str, cwd, dataset: str, folder, *entry: str) -> subprocess.CompletedProcess:
    """``mlflow run`` of the project on the folder (``entry``: ``-e <stage>``; default the pipeline)."""
    options = TINY if not entry else ()
    done = subprocess.run([sys.executable, "-m", "mlflow", "run", str(REPO), *entry, "--env-manager", "local",
                           "-P", f"dataset={dataset}", "-P", f"data_dir={folder}", *options],
                          cwd=cwd, env=subprocess_env(store), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    return done


def pipelines(client: MlflowClient, dataset: str) -> list:
    """The dataset's pipeline runs, oldest first."""
    home = client.get_experiment_by_name(f"ar-gse/{dataset}").experiment_id
    runs = client.search_runs([home], order_by=["attributes.start_time ASC"])
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # the stages' runs are its children


def steps(pipeline) -> dict[str, str]:
    """What the pipeline did at each step: ``ran`` or ``reused``."""
    return {step: pipeline.data.tags[f"argse.step.{step}"].split(" ")[0] for step in STEPS}


def first_run(store: str, cwd, dataset: str, folder):
    """The project run on the folder for the first time: every stage ran, every run FINISHED, a
    champion registered. Returns the client, the dataset's experiment id and the champion."""
    mlflow_run(store, cwd, dataset, folder)
    client = MlflowClient()
    (pipeline,) = pipelines(client, dataset)
    assert steps(pipeline) == dict.fromkeys(STEPS, "ran")
    home = client.get_experiment_by_name(f"ar-gse/{dataset}").experiment_id
    assert {r.info.status for r in client.search_runs([home])} == {"FINISHED"}
    return client, home, client.get_model_version_by_alias(f"ar-gse-{dataset}", "champion")


@pytest.mark.slow
def test_a_png_folder_runs_serves_a_base64_png_reuses_its_runs_and_reruns_on_a_changed_image(store, tmp_path):
    folder = write_image_folder(tmp_path / "mine", per_class_test=30, size=32, suffix=".png")
    client, home, champion = first_run(store, tmp_path, "mine", folder)
    (splits_run,) = [r for r in client.search_runs([home]) if r.data.tags.get("argse.stage") == "splits"]
    assert [i.dataset.name for i in splits_run.inputs.dataset_inputs if i.tags[0].value == "folder"] == ["mine"]
    listed = client.download_artifacts(splits_run.info.run_id, "data/files.tsv", str(tmp_path))
    assert sum(1 for _ in open(listed)) - 1 == len(list(folder.rglob("*.png")))

    # Served: a PNG of the folder, base64 in the JSON request, answered as its decoded pixels are.
    image = next((folder / "test").rglob("*.png"))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/ar-gse-mine/{champion.version}",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=subprocess_env(store), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server)
        encoded = base64.b64encode(image.read_bytes()).decode()
        status, body = post_json(f"http://127.0.0.1:{port}/invocations",
                                 {"dataframe_split": {"columns": ["image"], "data": [[encoded]]}})
        assert status == 200, body
        pixels = read_image(image, 32, 3)
        assert np.array_equal(pixels, np.asarray(Image.open(image).convert("RGB")))  # 32x32 already: decoded as is
        status, as_pixels = post_json(f"http://127.0.0.1:{port}/invocations", {"inputs": pixels[None].tolist()})
        assert status == 200, as_pixels
        assert body["predictions"] == as_pixels["predictions"]
    finally:
        server.terminate()
        server.wait(timeout=30)

    # The same command again: every stage reused.
    mlflow_run(store, tmp_path, "mine", folder)
    assert steps(pipelines(client, "mine")[-1]) == dict.fromkeys(STEPS, "reused")

    # One training image changed: the splits stage runs again (every later stage reads its run, so it
    # would run again too), on a new file list.
    changed = next((folder / "train").rglob("*.png"))
    Image.fromarray(255 - np.asarray(Image.open(changed))).save(changed)
    done = mlflow_run(store, tmp_path, "mine", folder, "-e", "splits")
    assert "reused" not in done.stdout, done.stdout
    new_splits = [r for r in client.search_runs([home]) if r.data.tags.get("argse.stage") == "splits"
                  and r.info.run_id != splits_run.info.run_id]
    assert len(new_splits) == 1 and new_splits[0].info.status == "FINISHED"
    assert new_splits[0].data.params["data_digest"] != splits_run.data.params["data_digest"]


@pytest.mark.slow
def test_jpeg_list_files_run_end_to_end_and_the_champion_answers_a_jpeg_of_the_folder(store, tmp_path):
    folder = write_image_folder(tmp_path / "listed", per_class_test=30, size=32, suffix=".jpg", lists=True)
    assert (folder / "train.txt").is_file() and not (folder / "train").exists()
    _, _, champion = first_run(store, tmp_path, "listed", folder)

    import mlflow.pyfunc
    import pandas as pd

    model = mlflow.pyfunc.load_model(f"models:/ar-gse-listed/{champion.version}")
    line = (folder / "test.txt").read_text().splitlines()[0]
    image = folder / line.split()[0]
    encoded = base64.b64encode(image.read_bytes()).decode()
    answer = model.predict(pd.DataFrame({"image": [encoded]}))
    expected = model.predict(read_image(image, 32, 3)[None])
    assert answer.to_dict("records") == expected.to_dict("records")
