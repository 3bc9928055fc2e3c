"""GoraState on disk: round trip, atomic saves, interrupted saves, damaged and foreign files."""

import dataclasses
import json
import os
import pathlib

import pytest
import torch

import gora.atomic
import gora.state
from gora import GoraState
from gora.errors import GoraStateError
from gora.state import META_FILE, TENSOR_FILE


def make_state(seed: int = 0, gamma: float = 0.05) -> GoraState:
    """A small consistent state: two adapted layers and one left out (rank 0)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"enc.0.q": (6, 4), "enc.0.v": (5, 4), "enc.1.q": (6, 4)}
    ranks = {"enc.0.q": 2, "enc.0.v": 3, "enc.1.q": 0}
    return GoraState(
        ranks=ranks, importance={"enc.0.q": 0.25, "enc.0.v": 0.75}, shapes=shapes,
        A={n: torch.rand(r, shapes[n][1], generator=generator) for n, r in ranks.items() if r},
        C={n: torch.randn(shapes[n][0], r, generator=generator) for n, r in ranks.items() if r},
        skipped={"enc.1.q": "no gradient"}, reference_rank=2, lora_alpha=4.0, gamma=gamma, seed=seed,
        config={"num_steps": 3, "extra": {"run": "unit"}}, num_steps=3, num_samples=12, budget=40,
        actual_params=41, versions={"torch": torch.__version__}, model_class="Tiny", notes={"fp16": False},
    )


def assert_same_state(loaded: GoraState, original: GoraState) -> None:
    for field in ("ranks", "importance", "shapes", "skipped", "reference_rank", "lora_alpha", "gamma", "seed",
                  "config", "num_steps", "num_samples", "budget", "actual_params", "versions", "model_class", "notes"):
        assert getattr(loaded, field) == getattr(original, field), field
    assert set(loaded.A) == set(original.A) and set(loaded.C) == set(original.C)
    for name in original.A:
        assert torch.equal(loaded.A[name], original.A[name]) and torch.equal(loaded.C[name], original.C[name])


def leftovers(directory: pathlib.Path) -> list[str]:
    """Temporary or backup directories a save may leave next to its target."""
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# -- round trip ---------------------------------------------------------------------------------
def test_saved_state_loads_back_identical(tmp_path):
    state = make_state()
    state.save(tmp_path / "state")
    assert sorted(os.listdir(tmp_path / "state")) == [META_FILE, TENSOR_FILE]
    assert_same_state(GoraState.load(tmp_path / "state"), state)


def test_saving_again_replaces_the_previous_state_and_leaves_nothing_behind(tmp_path):
    make_state(seed=0).save(tmp_path / "state")
    newer = make_state(seed=1, gamma=0.01)
    newer.save(tmp_path / "state")
    assert_same_state(GoraState.load(tmp_path / "state"), newer)
    assert leftovers(tmp_path) == []


def test_reformatted_json_with_the_same_content_still_loads(tmp_path):
    state = make_state()
    state.save(tmp_path / "state")
    meta_path = tmp_path / "state" / META_FILE
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(reversed(list(meta.items())))))  # other key order, no indentation
    assert_same_state(GoraState.load(tmp_path / "state"), state)


# -- the format on disk: a state saved by format version 1 loads, and saves back to the same JSON ----------------
# ``gora_state.json`` as gora-peft 0.1.0's save wrote it for ``full_state()``. Its tensor file is not committed (no
# binary files in the repository): ``_format_1_dir`` writes it with format 1's layout, independently of gora's
# writer, and puts that file's size and checksums into the copy of the JSON.
SAVED_FORMAT_1 = pathlib.Path(__file__).parent / "data" / "state_format_1"
FORMAT_1_PREFIXES = {"A": "A::", "C": "C::", "head": "H::"}  # format 1's tensor keys: field prefix + name


def _format_1_dir(directory: pathlib.Path) -> pathlib.Path:
    """The committed format-1 JSON plus a tensor file written the way format 1 lays it out."""
    from safetensors.torch import save_file

    from gora.atomic import sha256_file

    directory.mkdir(parents=True)
    state = full_state()
    tensors = {prefix + name: tensor.contiguous() for field, prefix in FORMAT_1_PREFIXES.items()
               for name, tensor in getattr(state, field).items()}
    save_file(tensors, str(directory / TENSOR_FILE), metadata={"format": "gora", "version": "1"})
    meta = json.loads((SAVED_FORMAT_1 / META_FILE).read_text())
    meta["tensors_sha256"] = sha256_file(directory / TENSOR_FILE)
    meta["tensors_bytes"] = (directory / TENSOR_FILE).stat().st_size
    meta["meta_sha256"] = gora.state._metadata_checksum(meta)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return directory


def full_state() -> GoraState:
    """The state of ``SAVED_FORMAT_1``: every field set to something other than its default (a skipped layer outside
    ``ranks``, a warmed head in fp16 and fp32, initial-step diagnostics)."""
    generator = torch.Generator().manual_seed(7)
    shapes = {"enc.0.q": (6, 4), "enc.0.v": (5, 4), "enc.1.q": (6, 4)}
    ranks = {"enc.0.q": 2, "enc.0.v": 3, "enc.1.q": 0}
    return GoraState(
        ranks=ranks, importance={"enc.0.q": 0.25, "enc.0.v": 0.75}, shapes=shapes,
        A={n: torch.rand(r, shapes[n][1], generator=generator) for n, r in ranks.items() if r},
        C={n: torch.randn(shapes[n][0], r, generator=generator) for n, r in ranks.items() if r},
        skipped={"enc.1.q": "no gradient", "lm_head": "tied to the input embeddings"},
        reference_rank=2, lora_alpha=4.0, gamma=0.05, seed=3,
        config={"num_steps": 3, "importance": "mean_abs", "extra": {"run": "unit"}}, num_steps=3, num_samples=12,
        budget=40, actual_params=41, estimation_seconds=1.25, peak_memory_bytes=123456,
        versions={"gora-peft": "0.1.0", "python": "3.11.9", "torch": "2.11.0"}, model_class="Tiny",
        notes={"fp16": False, "adaptive_gamma": {"losses": [1.5, 1.25]}},
        init_stats={"relative_delta": 0.01, "loss_w0": 0.69, "loss_after": 0.6, "loss_se": 0.02, "gamma": 0.05,
                    "per_layer": {"enc.0.q": 0.02}},
        head={"classifier.weight": torch.randn(2, 4, generator=generator).half(), "classifier.bias": torch.zeros(2)},
    )


def test_a_state_saved_by_format_version_1_loads_with_every_field(tmp_path):
    expected = full_state()
    loaded = GoraState.load(_format_1_dir(tmp_path / "format_1"))
    for field in dataclasses.fields(GoraState):
        value, wanted = getattr(loaded, field.name), getattr(expected, field.name)
        if field.name in ("A", "C", "head"):
            assert value.keys() == wanted.keys(), field.name
            for name, tensor in wanted.items():
                assert value[name].dtype == tensor.dtype and torch.equal(value[name], tensor), (field.name, name)
        else:
            assert value == wanted, field.name


def test_saving_writes_format_version_1_as_before(tmp_path):
    """The state saved again gives the committed JSON (apart from the tensor file's size and checksums, which depend
    on how the installed safetensors lays the file out) and format 1's tensors: keys, metadata, dtypes, values."""
    full_state().save(tmp_path / "state")
    old_json, new_json = (SAVED_FORMAT_1 / META_FILE).read_bytes(), (tmp_path / "state" / META_FILE).read_bytes()
    assert _without_checksums(new_json) == _without_checksums(old_json)
    from safetensors import safe_open

    reference = _format_1_dir(tmp_path / "format_1")
    with safe_open(tmp_path / "state" / TENSOR_FILE, "pt") as new, safe_open(reference / TENSOR_FILE, "pt") as old:
        assert new.metadata() == old.metadata() and sorted(new.keys()) == sorted(old.keys())
        for key in old.keys():
            assert new.get_tensor(key).dtype == old.get_tensor(key).dtype, key
            assert torch.equal(new.get_tensor(key), old.get_tensor(key)), key


def _without_checksums(data: bytes) -> dict:
    return {k: v for k, v in json.loads(data).items() if k not in ("tensors_sha256", "tensors_bytes", "meta_sha256")}


def test_the_files_schema_is_the_dataclass_fields(tmp_path):
    """Every GoraState field says where it is stored; the JSON holds exactly the JSON fields (plus the format's
    header and checksums), the tensor file exactly the tensor fields' prefixes."""
    from gora.state import STORED, InJson, InTensors

    stored = {spec.name: spec.metadata[STORED] for spec in dataclasses.fields(GoraState)}
    assert all(isinstance(where, (InJson, InTensors)) for where in stored.values())
    full_state().save(tmp_path / "state")
    meta = json.loads((tmp_path / "state" / META_FILE).read_text())
    header = {"format", "format_version", "meta_sha256", "tensors_sha256", "tensors_bytes"}
    assert set(meta) - header == {name for name, where in stored.items() if isinstance(where, InJson)}
    from safetensors.torch import load_file

    prefixes = {key.split("::")[0] + "::" for key in load_file(str(tmp_path / "state" / TENSOR_FILE))}
    assert prefixes == {where.prefix for where in stored.values() if isinstance(where, InTensors)}


# -- interrupted saves ---------------------------------------------------------------------------
def _half_written_tensors(monkeypatch, error: BaseException):
    real = gora.state.save_file

    def save_file_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        size = os.path.getsize(filename)
        with open(filename, "r+b") as handle:
            handle.truncate(size // 2)  # the disk filled up half way
        raise error

    monkeypatch.setattr(gora.state, "save_file", save_file_then_fail)


def _half_written_json(monkeypatch, error: BaseException):
    real = pathlib.Path.write_text

    def write_half_then_fail(self, data, *args, **kwargs):
        if self.name == META_FILE:
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise error
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_half_then_fail)


INTERRUPTIONS = {
    "tensor file, disk full": (_half_written_tensors, OSError(28, "No space left on device")),
    "tensor file, Ctrl-C": (_half_written_tensors, KeyboardInterrupt()),
    "json file, disk full": (_half_written_json, OSError(28, "No space left on device")),
    "json file, Ctrl-C": (_half_written_json, KeyboardInterrupt()),
}


def _expected(error: BaseException) -> tuple[type, str | None]:
    """What save raises for the injected fault: a disk-full OSError becomes a GoraStateError naming the path and the
    OSError's reason (the OSError chained as its cause); an interrupt passes through as itself."""
    if isinstance(error, OSError):
        return GoraStateError, r"cannot write \S*state \(No space left on device\)"
    return type(error), None


def _injected(raised: BaseException) -> BaseException | None:
    """The fault behind what save raised: the GoraStateError's cause, or the interrupt itself."""
    return raised.__cause__ if isinstance(raised, GoraStateError) else raised


@pytest.mark.parametrize("break_save, error", INTERRUPTIONS.values(), ids=INTERRUPTIONS.keys())
def test_interrupted_first_save_leaves_no_state_at_all(tmp_path, monkeypatch, break_save, error):
    break_save(monkeypatch, error)
    with pytest.raises(_expected(error)[0], match=_expected(error)[1]) as raised:
        make_state().save(tmp_path / "state")
    assert _injected(raised.value) is error  # the injected fault itself was reached
    monkeypatch.undo()
    assert not (tmp_path / "state").exists()
    assert leftovers(tmp_path) == []
    with pytest.raises(GoraStateError, match="does not exist"):
        GoraState.load(tmp_path / "state")


@pytest.mark.parametrize("break_save, error", INTERRUPTIONS.values(), ids=INTERRUPTIONS.keys())
def test_interrupted_save_keeps_the_previous_state_intact(tmp_path, monkeypatch, break_save, error):
    previous = make_state(seed=0)
    previous.save(tmp_path / "state")
    before = {name: (tmp_path / "state" / name).read_bytes() for name in (META_FILE, TENSOR_FILE)}
    break_save(monkeypatch, error)
    with pytest.raises(_expected(error)[0], match=_expected(error)[1]) as raised:
        make_state(seed=1).save(tmp_path / "state")
    assert _injected(raised.value) is error  # the injected fault itself was reached
    monkeypatch.undo()
    assert {name: (tmp_path / "state" / name).read_bytes() for name in (META_FILE, TENSOR_FILE)} == before
    assert_same_state(GoraState.load(tmp_path / "state"), previous)
    assert leftovers(tmp_path) == []


def test_interrupt_between_the_two_renames_puts_the_previous_state_back(tmp_path, monkeypatch):
    previous = make_state(seed=0)
    previous.save(tmp_path / "state")
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # final -> .old done; .tmp -> final interrupted
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(gora.atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        make_state(seed=1).save(tmp_path / "state")
    monkeypatch.undo()
    assert len(calls) == 3  # the third call moved the previous state back
    assert_same_state(GoraState.load(tmp_path / "state"), previous)
    assert leftovers(tmp_path) == []


def test_a_process_killed_between_the_renames_is_reported_with_the_backup_to_restore(tmp_path):
    make_state().save(tmp_path / "state")
    os.replace(tmp_path / "state", tmp_path / ".state.old-1234abcd")  # what SIGKILL at that instant leaves
    with pytest.raises(GoraStateError, match=r"interrupted.*\.state\.old-1234abcd: rename it"):
        GoraState.load(tmp_path / "state")


# -- saves killed mid-way (SIGKILL): what they leave is cleaned by the next save or load ----------------------
KILL_AT = {
    # the tensor file written, then the process dies: an unfinished ``.state.tmp-PID-*``
    "while writing": "gora.state.save_file",
    # the previous state moved aside, the new one not yet in place: ``.state.old-PID-*`` is the only complete copy
    "between the renames": "second os.replace",
    # the new state in place, the moved-aside previous one not yet removed: a stale ``.state.old-PID-*``
    "before removing the backup": "shutil.rmtree",
}
KILLED_SAVE = """
import os, shutil, signal, sys
sys.path.insert(0, {tests!r})
import gora.atomic, gora.state
from test_state_files import make_state

where = {where!r}
die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
if where == "gora.state.save_file":
    real = gora.state.save_file
    gora.state.save_file = lambda *args, **kwargs: (real(*args, **kwargs), die())
elif where == "second os.replace":
    real, calls = os.replace, []
    gora.atomic.os.replace = lambda *args: die() if calls.append(args) or len(calls) == 2 else real(*args)
else:
    gora.atomic.shutil.rmtree = die
make_state(seed=1).save({target!r})
"""


def _killed_save(target: pathlib.Path, where: str) -> None:
    """Save a state to ``target`` in another process that gets SIGKILL at ``where``."""
    import signal
    import subprocess
    import sys

    code = KILLED_SAVE.format(tests=str(pathlib.Path(__file__).parent), where=where, target=str(target))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr


@pytest.mark.slow  # a Python process per case, killed mid-save
@pytest.mark.parametrize("where", KILL_AT.values(), ids=KILL_AT.keys())
def test_leftovers_of_a_killed_save_are_cleaned_by_the_next_load(tmp_path, where):
    previous = make_state(seed=0)
    previous.save(tmp_path / "state")
    _killed_save(tmp_path / "state", where)
    left = leftovers(tmp_path)
    kinds = {"gora.state.save_file": ["tmp"], "second os.replace": ["old", "tmp"], "shutil.rmtree": ["old"]}[where]
    assert [name.split(".")[2].split("-")[0] for name in left] == kinds, left
    if where == "second os.replace":  # the backup is the only complete copy: reported, kept, never loaded instead
        backup = left[0]
        with pytest.raises(GoraStateError, match=rf"previous complete state is at \S*{backup}: rename it"):
            GoraState.load(tmp_path / "state")
        assert leftovers(tmp_path) == [backup]  # the unfinished new save is gone
        os.replace(tmp_path / backup, tmp_path / "state")  # what the message says to do
    loaded = GoraState.load(tmp_path / "state")
    assert_same_state(loaded, make_state(seed=1) if "rmtree" in where else previous)
    assert leftovers(tmp_path) == []


@pytest.mark.slow  # a Python process per case, killed mid-save
@pytest.mark.parametrize("where", KILL_AT.values(), ids=KILL_AT.keys())
def test_leftovers_of_a_killed_save_are_cleaned_by_the_next_save(tmp_path, where):
    make_state(seed=0).save(tmp_path / "state")
    _killed_save(tmp_path / "state", where)
    assert leftovers(tmp_path)
    newer = make_state(seed=2)
    newer.save(tmp_path / "state")
    assert leftovers(tmp_path) == []
    assert_same_state(GoraState.load(tmp_path / "state"), newer)


@pytest.mark.slow  # a Python process, killed mid-save
def test_an_unfinished_first_save_is_not_taken_for_a_state_or_a_backup(tmp_path):
    _killed_save(tmp_path / "state", KILL_AT["while writing"])
    (tmp_path / "state.tmp-1").mkdir()  # another target whose name looks like a scratch directory: not ours
    (tmp_path / ".state.tmp-1.tmp-99-0123abcd").mkdir()  # and a scratch directory of that other target
    with pytest.raises(GoraStateError, match=r"does not exist\. Save one"):
        GoraState.load(tmp_path / "state")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".state.tmp-1.tmp-99-0123abcd", "state.tmp-1"]


def test_a_running_save_s_directories_are_left_alone(tmp_path):
    make_state().save(tmp_path / "state")
    running = tmp_path / f".state.tmp-{os.getppid()}-0123abcd"  # a live process (this one's parent) writes it
    running.mkdir()
    GoraState.load(tmp_path / "state")
    make_state(seed=1).save(tmp_path / "state")
    assert running.is_dir()


# -- refusing to destroy what is not ours --------------------------------------------------------
def test_save_refuses_to_replace_a_directory_with_other_content(tmp_path):
    target = tmp_path / "project"
    target.mkdir()
    (target / "train.py").write_text("print('precious')")
    with pytest.raises(GoraStateError, match="refusing to replace .* train.py"):
        make_state().save(target)
    assert (target / "train.py").read_text() == "print('precious')"
    assert leftovers(tmp_path) == []


def test_save_refuses_a_path_that_is_a_file(tmp_path):
    target = tmp_path / "state"
    target.write_text("notes")
    with pytest.raises(GoraStateError, match="is a file, not a directory"):
        make_state().save(target)
    assert target.read_text() == "notes"


def test_save_into_an_existing_empty_directory_works(tmp_path):
    (tmp_path / "state").mkdir()
    make_state().save(tmp_path / "state")
    assert_same_state(GoraState.load(tmp_path / "state"), make_state())


# -- what save refuses before writing anything ----------------------------------------------------
def _bad_states():
    wrong_a = make_state()
    wrong_a.A["enc.0.q"] = torch.zeros(3, 4)
    missing_c = make_state()
    del missing_c.C["enc.0.v"]
    nan_c = make_state()
    nan_c.C["enc.0.q"][0, 0] = float("nan")
    negative = make_state()
    negative.ranks["enc.1.q"] = -1
    no_shape = make_state()
    del no_shape.shapes["enc.0.v"]
    bad_gamma = make_state(gamma=float("nan"))
    float_rank = make_state()
    float_rank.ranks["enc.0.q"] = 2.0
    return {
        "A of the wrong shape": (wrong_a, r"enc.0.q: A \(3, 4\)"),
        "C missing": (missing_c, "enc.0.v: missing A or C"),
        "NaN in C": (nan_c, "enc.0.q: non-finite values"),
        "negative rank": (negative, "enc.1.q: negative rank -1"),
        "no shape": (no_shape, r"enc.0.v: no \(out, in\) shape"),
        "NaN gamma": (bad_gamma, "gamma nan is not a finite number"),
        "float rank": (float_rank, "enc.0.q: rank 2.0 is not an integer"),
    }


@pytest.mark.parametrize("state, message", _bad_states().values(), ids=_bad_states().keys())
def test_inconsistent_state_is_refused_before_anything_is_written(tmp_path, state, message):
    with pytest.raises(GoraStateError, match=message):
        state.save(tmp_path / "state")
    assert os.listdir(tmp_path) == []


def test_notes_that_are_not_json_are_refused_before_anything_is_written(tmp_path):
    state = make_state()
    state.notes["tensor"] = torch.zeros(2)
    with pytest.raises(GoraStateError, match="cannot be written as JSON"):
        state.save(tmp_path / "state")
    assert os.listdir(tmp_path) == []


# -- damaged, missing and foreign files -----------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    make_state().save(tmp_path / "state")
    return tmp_path / "state"


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(GoraStateError, match="does not exist.*state.save"):
        GoraState.load(tmp_path / "nowhere")


def test_a_file_instead_of_a_directory_is_reported(tmp_path):
    (tmp_path / "state").write_text("{}")
    with pytest.raises(GoraStateError, match="is a file, not a directory"):
        GoraState.load(tmp_path / "state")


@pytest.mark.parametrize("name, message", [(META_FILE, "gora_state.json is missing"),
                                           (TENSOR_FILE, "gora_state.safetensors is missing")])
def test_a_missing_file_is_reported(saved, name, message):
    (saved / name).unlink()
    with pytest.raises(GoraStateError, match=message):
        GoraState.load(saved)


def test_truncated_tensor_file_is_detected_by_size(saved):
    data = (saved / TENSOR_FILE).read_bytes()
    (saved / TENSOR_FILE).write_bytes(data[:-7])
    with pytest.raises(GoraStateError, match="truncated or corrupted"):
        GoraState.load(saved)


def test_one_flipped_bit_in_the_tensors_is_detected_by_checksum(saved):
    data = bytearray((saved / TENSOR_FILE).read_bytes())
    data[-3] ^= 0x01  # inside the last fp32 value: still a valid safetensors file, same size
    (saved / TENSOR_FILE).write_bytes(bytes(data))
    with pytest.raises(GoraStateError, match="does not match its size and checksum"):
        GoraState.load(saved)


def test_an_edited_value_in_the_json_is_detected_by_its_checksum(saved):
    meta = json.loads((saved / META_FILE).read_text())
    meta["gamma"] = 0.5  # valid JSON, plausible value, but not what was estimated
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(GoraStateError, match="does not match its own checksum"):
        GoraState.load(saved)


def test_truncated_json_is_reported(saved):
    text = (saved / META_FILE).read_text()
    (saved / META_FILE).write_text(text[: len(text) // 3])
    with pytest.raises(GoraStateError, match="cannot be read as JSON"):
        GoraState.load(saved)


def test_files_from_two_different_states_are_not_mixed(tmp_path):
    make_state(seed=0).save(tmp_path / "a")
    make_state(seed=1).save(tmp_path / "b")
    os.replace(tmp_path / "b" / TENSOR_FILE, tmp_path / "a" / TENSOR_FILE)
    with pytest.raises(GoraStateError, match="checksum"):
        GoraState.load(tmp_path / "a")


@pytest.mark.parametrize("edit, message", [
    (lambda meta: meta.update(format_version=99), "format version 99"),
    (lambda meta: meta.update(format="adapter"), "not a GoRA state file"),
    (lambda meta: meta.pop("tensors_sha256"), "lacks 'tensors_sha256'"),
])
def test_foreign_or_future_json_is_refused(saved, edit, message):
    meta = json.loads((saved / META_FILE).read_text())
    edit(meta)
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(GoraStateError, match=message):
        GoraState.load(saved)


@pytest.mark.parametrize("edit, message", [
    ({"ranks": {"enc.0.q": 2.7, "enc.0.v": 3, "enc.1.q": 0}},
     r"malformed \(ranks: expected an integer >= 0, got 2\.7\)"),
    ({"reference_rank": 0}, r"malformed \(reference_rank: expected an integer >= 1, got 0\)"),
    ({"skipped": {"enc.1.q": 3}}, r"malformed \(skipped: expected a string, got 3\)"),
    ({"notes": []}, r"malformed \(notes: expected an object, got \[\]\)"),
])
def test_a_malformed_value_is_reported_with_its_field(saved, edit, message):
    meta = json.loads((saved / META_FILE).read_text())
    meta.update(edit)
    meta["meta_sha256"] = gora.state._metadata_checksum(meta)  # edited with care: the checksum fits
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(GoraStateError, match=message + "; re-run estimate_gora"):
        GoraState.load(saved)


@pytest.mark.parametrize("key", ["ranks", "importance", "shapes", "reference_rank", "lora_alpha", "gamma", "seed"])
def test_a_file_without_a_required_field_is_reported_as_damaged(saved, key):
    meta = json.loads((saved / META_FILE).read_text())
    del meta[key]
    meta["meta_sha256"] = gora.state._metadata_checksum(meta)
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(GoraStateError, match=f"lacks '{key}'; the file is damaged"):
        GoraState.load(saved)


def test_a_file_written_before_a_field_existed_loads_with_the_field_s_default(saved):
    meta = json.loads((saved / META_FILE).read_text())
    for key in ("init_stats", "skipped", "notes", "peak_memory_bytes"):
        del meta[key]
    meta["meta_sha256"] = gora.state._metadata_checksum(meta)
    (saved / META_FILE).write_text(json.dumps(meta))
    loaded = GoraState.load(saved)
    assert (loaded.init_stats, loaded.skipped, loaded.notes, loaded.peak_memory_bytes) == ({}, {}, {}, 0)


def test_a_state_of_a_newer_format_names_the_gora_peft_version_that_reads_it(saved):
    meta = json.loads((saved / META_FILE).read_text())
    meta.update(format_version=gora.state.FORMAT_VERSION + 1, versions={"gora-peft": "7.1.0"})
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(GoraStateError, match=r"written by gora-peft 7\.1\.0.*pip install 'gora-peft>=7\.1\.0'"):
        GoraState.load(saved)
    meta.pop("versions")  # no record of the writer: still says what to do
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(GoraStateError, match="newer gora-peft that wrote it.*pip install --upgrade gora-peft"):
        GoraState.load(saved)


def test_a_peft_adapter_directory_is_not_taken_for_a_state(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    with pytest.raises(GoraStateError, match="not a GoRA state directory"):
        GoraState.load(tmp_path / "adapter")


def test_load_of_something_that_is_not_a_path_is_a_type_error_of_the_gora_family():
    from gora.errors import GoraTypeError

    for wrong in (None, 123, make_state()):
        with pytest.raises(GoraTypeError, match="needs the path of a saved state"):
            GoraState.load(wrong)


def test_a_path_that_cannot_be_examined_is_a_gora_state_error(tmp_path, monkeypatch):
    make_state().save(tmp_path / "state")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "is_dir", refuse)
    monkeypatch.setattr(pathlib.Path, "iterdir", refuse)
    with pytest.raises(GoraStateError, match=r"cannot read \S*state \(Permission denied\)"):
        GoraState.load(tmp_path / "state")
