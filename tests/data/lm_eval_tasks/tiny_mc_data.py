"""Loader of the l2e_tiny_mc lm-eval task: reads tiny_mc.jsonl next to this file (no hub, no datasets cache)."""

import json
from pathlib import Path

import datasets


def load(**_kwargs) -> datasets.DatasetDict:
    lines = (Path(__file__).parent / "tiny_mc.jsonl").read_text().splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line])})
