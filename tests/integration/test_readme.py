"""The README's Quick start runs as pasted on the installed MiniLM, and its adapter loads in vanilla PEFT."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import minilm_path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def _quick_start_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _fresh_minilm():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # as the Quick start does: the same new head
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()


def _probe() -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    return dict(tokenizer(["an unexpected, moving story", "i left halfway through"], padding=True,
                          return_tensors="pt"))


def test_the_quick_start_runs_as_pasted_and_its_adapter_loads_in_vanilla_peft(tmp_path, monkeypatch, capsys):
    from peft import PeftModel

    minilm_path()  # skips where the MiniLM package is not installed
    one_call, two_steps = _quick_start_blocks()
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}  # nothing given: the blocks load their own model and batches
    exec(compile(one_call, "README.md (Quick start, one call)", "exec"), namespace)
    peft_model = namespace["peft_model"].eval()
    assert isinstance(peft_model, PeftModel)
    assert "trainable params" in capsys.readouterr().out
    ranks = {name: module.r["default"] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert len(set(ranks.values())) > 1  # GoRA's ranks, not LoRA's single r
    probe = _probe()
    with torch.no_grad():
        expected = peft_model(**probe).logits
        reloaded = PeftModel.from_pretrained(_fresh_minilm(), str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(reloaded(**probe).logits, expected)
        assert not torch.allclose(_fresh_minilm()(**probe).logits, expected)  # GoRA's start is not the base model

    # the two-step form, pasted after the first block: same model, batches and seed give the same adapter
    exec(compile(two_steps, "README.md (Quick start, two steps)", "exec"), namespace)
    assert "budget" in capsys.readouterr().out  # state.summary()
    assert (tmp_path / "gora_state").is_dir()
    with torch.no_grad():
        torch.testing.assert_close(namespace["peft_model"].eval()(**probe).logits, expected)


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens (code blocks skipped)."""
    prose = re.sub(r"```.*?```", "", markdown, flags=re.S)
    headings = re.findall(r"^#+ (.+)$", prose, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_of_the_readme_points_into_the_repository():
    text = README.read_text()
    links = [t for t in re.findall(r"\]\(([^)]+)\)", text) if "://" not in t]
    assert links, "the README links its docs, examples and results"
    missing = [t for t in links if not (ROOT / t.split("#", 1)[0]).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
    broken = [t for t in links if "#" in t and t.split("#", 1)[1] not in _anchors((ROOT / t.split("#")[0]).read_text())]
    assert not broken, f"README links to headings that do not exist: {broken}"


@pytest.mark.parametrize("command", ["make demo", "make test"])
def test_the_two_set_up_commands_stay_in_the_readme_and_the_makefile(command):
    assert f"\n{command}    # installs the pinned dependencies" in README.read_text()
    assert f"\n{command.split()[1]}: setup" in (ROOT / "Makefile").read_text()


def test_the_architecture_section_lists_every_module_of_the_package_and_no_other():
    text = README.read_text()
    section = text.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    tree = re.search(r"```\nsrc/gora/\n(.*?)```", section, flags=re.S)
    assert tree, "the Architecture section draws src/gora/ as a tree"
    names = re.findall(r"^  (\w+\.py|\w+/) ", tree.group(1), flags=re.M)
    listed = set(names)
    assert len(names) == len(listed), f"a module is drawn twice: {sorted(n for n in listed if names.count(n) > 1)}"
    package = ROOT / "src" / "gora"
    present = {p.name for p in package.glob("*.py") if p.name != "__main__.py"}
    present |= {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert listed == present, f"missing from the README: {present - listed}; gone from the tree: {listed - present}"
