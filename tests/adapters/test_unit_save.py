"""`orchmoe.adapters.unit_save`: PEFT's ``save_pretrained`` over an existing orchmoe adapter is one unit: a kill
between its two files leaves the old adapter, not new weights beside the old config's checksum; the folder's
other files stay."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from core_helpers import method_config, randomize_adapter, tiny_base
from orchmoe import get_model, load_adapter
from orchmoe.adapters.folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS

# saves a first adapter, then a changed one, and dies the moment PEFT goes to write adapter_config.json: after
# adapter_model.safetensors was written (without orchmoe's unit, into the folder itself)
_KILLED_SAVE = """
import os, sys
import torch
from peft import PeftConfig
from core_helpers import method_config, randomize_adapter, tiny_base
from orchmoe import get_model
folder = sys.argv[1]
model = get_model(tiny_base("llama"), method_config("orchmoe"))
randomize_adapter(model.base_model, seed=1)
model.save_pretrained(folder)
randomize_adapter(model.base_model, seed=2)
PeftConfig.save_pretrained = lambda *a, **k: os.kill(os.getpid(), 9)
model.save_pretrained(folder)
"""


def test_a_save_killed_between_its_two_files_leaves_the_old_adapter(tmp_path):
    folder = tmp_path / "adapter"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}  # tests/ importable
    done = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(folder)], capture_output=True, env=env)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    first = get_model(tiny_base("llama"), method_config("orchmoe"))
    randomize_adapter(first.base_model, seed=1)
    loaded = load_adapter(tiny_base("llama"), folder)  # loads: the old adapter, whole
    for name, p in first.base_model.adapter_state_dict().items():
        assert torch.equal(loaded.base_model.adapter_state_dict()[name], p), name


@pytest.mark.parametrize("how", ["get_model", "load_adapter"])
def test_a_save_over_an_adapter_keeps_the_folders_other_files(how, tmp_path):
    folder = tmp_path / "adapter"
    model = get_model(tiny_base("llama"), method_config("orchmoe"))
    model.save_pretrained(folder)
    (folder / "notes.txt").write_text("mine")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("a b c")
    if how == "load_adapter":
        model = load_adapter(tiny_base("llama"), folder, is_trainable=True)
    randomize_adapter(model.base_model, seed=3)
    model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md", "notes.txt", "tokenizer"]
    )
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "tokenizer" / "vocab.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no stage left
    loaded = load_adapter(tiny_base("llama"), folder)
    for name, p in model.base_model.adapter_state_dict().items():
        assert torch.equal(loaded.base_model.adapter_state_dict()[name], p), name
