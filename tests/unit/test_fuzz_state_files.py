"""Fuzz ``GoraState.load`` with damaged files.

Byte-level: truncated, bit-flipped, overwritten, extended, emptied or random ``gora_state.json`` and
``gora_state.safetensors``. Every outcome must be a load of the *unmodified* state or a
``GoraStateError``; never another exception type, never a silently altered state.

Structure-level: valid JSON / valid safetensors with random content whose checksums are re-computed
(as if hand-edited with care): the loader must still refuse with ``GoraStateError`` or return a
state that passes ``validate``; never a stray KeyError, TypeError, OverflowError, ...
"""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from gora import GoraState
from gora.atomic import sha256_file
from gora.errors import GoraStateError
from gora.state import META_FILE, TENSOR_FILE, _metadata_checksum

from test_state_files import assert_same_state, make_state

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FILES = (META_FILE, TENSOR_FILE)


@pytest.fixture(scope="module")
def template():
    """A saved state: (its directory, the state object, the original bytes of both files)."""
    directory = Path(tempfile.mkdtemp(prefix="gora-fuzz-"))
    state = make_state()
    state.save(directory / "state")
    yield directory / "state", state, {name: (directory / "state" / name).read_bytes() for name in FILES}
    shutil.rmtree(directory, ignore_errors=True)


def _load_damaged(template_dir: Path, replace: dict[str, bytes | None]):
    """Copy the template, replace (or delete, for None) some files, load: the state, or the GoraStateError."""
    with tempfile.TemporaryDirectory(prefix="gora-fuzz-case-") as scratch:
        target = Path(scratch) / "state"
        shutil.copytree(template_dir, target)
        for name, data in replace.items():
            if data is None:
                (target / name).unlink()
            else:
                (target / name).write_bytes(data)
        try:
            return GoraState.load(target)
        except GoraStateError as error:
            return error


@st.composite
def damaged_bytes(draw, original: bytes):
    kind = draw(st.sampled_from(["truncate", "flip", "digit", "overwrite", "insert", "append", "random", "empty"]))
    if kind == "digit":  # the silent kind of damage: still valid JSON, another number
        digits = [i for i, byte in enumerate(original) if chr(byte).isdigit()]
        position = draw(st.sampled_from(digits))
        other = draw(st.sampled_from([d for d in b"0123456789" if d != original[position]]))
        return original[:position] + bytes([other]) + original[position + 1:]
    if kind == "truncate":
        return original[: draw(st.integers(0, len(original) - 1))]
    if kind == "flip":
        position = draw(st.integers(0, len(original) - 1))
        mask = draw(st.integers(1, 255))
        return original[:position] + bytes([original[position] ^ mask]) + original[position + 1:]
    if kind == "overwrite":
        position = draw(st.integers(0, len(original) - 1))
        chunk = draw(st.binary(min_size=1, max_size=16))
        return original[:position] + chunk + original[position + len(chunk):]
    if kind == "insert":
        position = draw(st.integers(0, len(original)))
        return original[:position] + draw(st.binary(min_size=1, max_size=16)) + original[position:]
    if kind == "append":
        return original + draw(st.binary(min_size=1, max_size=64))
    if kind == "random":
        return draw(st.binary(min_size=0, max_size=512))
    return b""


@st.composite
def damage(draw, originals: dict[str, bytes]):
    """Damage to one or both files (or a deleted file)."""
    names = draw(st.sampled_from([(META_FILE,), (TENSOR_FILE,), FILES]))
    replace: dict[str, bytes | None] = {}
    for name in names:
        if draw(st.integers(0, 9)) == 0:
            replace[name] = None
        else:
            replace[name] = draw(damaged_bytes(originals[name]))
    return replace


@pytest.mark.slow  # FUZZ: 120 examples
@FUZZ
@given(data=st.data())
def test_damaged_state_files_load_unmodified_or_raise_gora_state_error(template, data):
    template_dir, state, originals = template
    replace = data.draw(damage(originals))
    outcome = _load_damaged(template_dir, replace)
    if isinstance(outcome, GoraStateError):
        return
    # a successful load is only acceptable for a change that does not alter the content
    assert_same_state(outcome, state)


@pytest.mark.parametrize("name", FILES)
def test_every_truncation_of_either_file_is_refused(template, name):
    template_dir, _, originals = template
    original = originals[name]
    step = max(1, len(original) // 97)  # about a hundred cut points, always including 0 and len - 1
    for cut in sorted(set(range(0, len(original), step)) | {len(original) - 1}):
        outcome = _load_damaged(template_dir, {name: original[:cut]})
        assert isinstance(outcome, GoraStateError), (name, cut)


# -- structure-level: valid files, random content, checksums re-computed --------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.integers(-10**400, 10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
META_KEYS = ["ranks", "importance", "shapes", "skipped", "reference_rank", "lora_alpha", "gamma", "seed", "config",
             "num_steps", "num_samples", "budget", "actual_params", "estimation_seconds", "peak_memory_bytes",
             "versions", "model_class", "notes", "tensors_bytes", "tensors_sha256", "format_version"]


def _write_meta(directory: Path, meta: dict) -> None:
    meta["meta_sha256"] = _metadata_checksum(meta)
    (directory / META_FILE).write_text(json.dumps(meta))


def _load_with_meta(template_dir: Path, meta: dict):
    with tempfile.TemporaryDirectory(prefix="gora-fuzz-case-") as scratch:
        target = Path(scratch) / "state"
        shutil.copytree(template_dir, target)
        _write_meta(target, meta)
        try:
            return GoraState.load(target)
        except GoraStateError as error:
            return error


@pytest.mark.parametrize("edits", [
    {"ranks": {"enc.0.q": 1e400, "enc.0.v": 3, "enc.1.q": 0}},  # int(inf) would raise OverflowError
    {"ranks": {"enc.0.q": 2.7, "enc.0.v": 3, "enc.1.q": 0}},  # int(2.7) would silently give 2
    {"shapes": {"enc.0.q": "64", "enc.0.v": [5, 4], "enc.1.q": [6, 4]}},  # int("6"), int("4") would pass
    {"reference_rank": True},
    {"ranks": ["enc.0.q", 2]},
    {"gamma": None},
    {"tensors_bytes": "1024"},
    {"gamma": 10**400},  # float(10**400) would raise OverflowError
    {"estimation_seconds": 10**400},
    {"importance": {"enc.0.q": 10**400, "enc.0.v": 0.75}},
    {"importance": {"enc.0.q": 1e400, "enc.0.v": 0.75}},  # json reads 1e400 as inf: not a score
    {"lora_alpha": 1e400},
    {"lora_alpha": 0},
])
def test_hand_edited_json_values_that_break_naive_parsing_are_refused(template, edits):
    template_dir, _, originals = template
    meta = json.loads(originals[META_FILE])
    meta.update(edits)
    assert isinstance(_load_with_meta(template_dir, meta), GoraStateError)


@pytest.mark.slow  # FUZZ: 120 examples
@FUZZ
@given(data=st.data())
def test_hand_edited_json_with_valid_checksum_never_raises_a_stray_exception(template, data):
    template_dir, _, originals = template
    meta = json.loads(originals[META_FILE])
    keys = data.draw(st.lists(st.sampled_from(META_KEYS), min_size=1, max_size=3, unique=True))
    edits = {key: data.draw(json_values) for key in keys}
    if data.draw(st.booleans()):  # or edit inside one of the per-layer maps
        field = data.draw(st.sampled_from(["ranks", "importance", "shapes", "skipped"]))
        edits[field] = dict(meta[field], **{"enc.0.q": data.draw(json_values)})
    meta.update(edits)
    outcome = _load_with_meta(template_dir, meta)
    if not isinstance(outcome, GoraStateError):
        outcome.validate()  # whatever loads is internally consistent


tensor_specs = st.dictionaries(
    st.sampled_from(["A::enc.0.q", "C::enc.0.q", "A::enc.0.v", "C::enc.0.v", "A::enc.1.q", "C::other", "junk"]),
    st.tuples(st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]),
              st.lists(st.integers(0, 7), min_size=0, max_size=3),
              st.sampled_from([0.0, 1.0, float("nan"), float("inf")])),
    max_size=6,
)


@pytest.mark.slow  # FUZZ: 120 examples
@FUZZ
@given(specs=tensor_specs)
def test_random_tensor_files_with_valid_checksums_load_consistently_or_raise_gora_state_error(template, specs):
    template_dir, _, originals = template
    tensors = {key: torch.full(shape, fill).to(dtype) for key, (dtype, shape, fill) in specs.items()}
    with tempfile.TemporaryDirectory(prefix="gora-fuzz-case-") as scratch:
        target = Path(scratch) / "state"
        shutil.copytree(template_dir, target)
        save_file(tensors, str(target / TENSOR_FILE))
        meta = json.loads(originals[META_FILE])
        meta["tensors_sha256"] = sha256_file(target / TENSOR_FILE)
        meta["tensors_bytes"] = (target / TENSOR_FILE).stat().st_size
        _write_meta(target, meta)
        try:
            loaded = GoraState.load(target)
        except GoraStateError:
            return
        loaded.validate()
        for name in loaded.adapted:
            assert loaded.A[name].dtype.is_floating_point and torch.isfinite(loaded.C[name]).all()
