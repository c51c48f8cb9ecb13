"""Tutorial 06 runs as documented on 2 processes, and its answers are the plain model's."""

from __future__ import annotations

import ast
import re

import pytest
import torch
from helpers import accel_cli

transformers = pytest.importorskip("transformers", reason="tutorial 06 uses transformers")


def test_06_big_model_on_ram_and_disk_answers_prompts_across_two_processes(tmp_path):
    result = accel_cli("launch", "-n", "2", "tutorials/06_big_model_inference.py",
                       "--workdir", str(tmp_path), "--new-tokens", "4",
                       extra_env={"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "gathered 6 answers from 2 process(es)" in out
    assert "-> cpu" in out and "-> disk" in out and "moving on to disk" in out
    assert len(re.findall(r"rank \d: 3 prompts", out)) == 2  # 6 prompts, 3 per rank
    answers = {int(i): (ast.literal_eval(p), ast.literal_eval(a))
               for i, p, a in re.findall(r"prompt (\d+): (\[.*?\]) -> (\[.*?\])", out)}
    assert sorted(answers) == list(range(6))

    # The same checkpoint, loaded whole the usual way, answers the same.
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "checkpoint").eval()
    for prompt, answer in answers.values():
        ids = torch.tensor([prompt])
        expected = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        assert answer == expected
