"""Signed callback URLs: what makes one, and what one will not accept."""

from __future__ import annotations

import pytest

from receiver import tokens
from receiver.models import CallbackRef

SECRET = "test-callback-secret-0123456789abcdef"
ACTION = "videos/text2video"


def split(path: str) -> tuple[str, str, str | None]:
    """The ref, signature and action of a path made by `callback_path`."""
    assert path.startswith(tokens.CALLBACK_PREFIX + "/")
    ref, sig, *action = path.removeprefix(tokens.CALLBACK_PREFIX + "/").split("/", 2)
    return ref, sig, action[0] if action else None


@pytest.mark.parametrize("action", [None, ACTION, "images/kolors-virtual-try-on"])
@pytest.mark.parametrize("ref", ["x-kr_01JDX3N5Q8", "h-0123456789abcdef0123"])
def test_round_trip(ref: str, action: str | None) -> None:
    """A path made for a ref (and action) verifies back to the same ref and action."""
    path = tokens.callback_path(SECRET, ref, action)
    assert split(path)[0] == ref
    assert split(path)[2] == action
    assert tokens.verify(SECRET, *split(path)) == CallbackRef(ref, action)


def test_paths_differ_by_secret_ref_and_action() -> None:
    """Changing the secret, the ref or the action changes the signature."""
    ref = tokens.task_ref("t1")
    sigs = {
        split(tokens.callback_path(secret, r, action))[1]
        for secret in (SECRET, SECRET + "x")
        for r in (ref, tokens.task_ref("t2"))
        for action in (None, ACTION)
    }
    assert len(sigs) == 8


def test_wrong_secret_is_refused() -> None:
    """A URL signed under another secret does not verify."""
    path = tokens.callback_path("another-secret-0123456789abcdef", tokens.task_ref("t1"), ACTION)
    assert tokens.verify(SECRET, *split(path)) is None


def test_altered_ref_is_refused() -> None:
    """A signature does not carry over to another ref, even one differing by a character."""
    ref, sig, action = split(tokens.callback_path(SECRET, tokens.task_ref("task1"), ACTION))
    for other in ("x-task2", "x-task1a", "h-task1", "x-TASK1"):
        assert tokens.verify(SECRET, other, sig, action) is None
    assert tokens.verify(SECRET, ref, sig, action) is not None


def test_altered_action_is_refused() -> None:
    """A signature does not carry over to another action, to none, or from none to one."""
    ref, sig, action = split(tokens.callback_path(SECRET, tokens.task_ref("t1"), ACTION))
    assert tokens.verify(SECRET, ref, sig, "videos/image2video") is None
    assert tokens.verify(SECRET, ref, sig, None) is None
    bare_ref, bare_sig, _ = split(tokens.callback_path(SECRET, tokens.task_ref("t1")))
    assert tokens.verify(SECRET, bare_ref, bare_sig, ACTION) is None
    assert tokens.verify(SECRET, ref, sig, action) is not None


def test_altered_sig_is_refused() -> None:
    """Changing any one character of the signature makes it fail."""
    ref, sig, action = split(tokens.callback_path(SECRET, tokens.task_ref("t1"), ACTION))
    for position in range(len(sig)):
        changed = "A" if sig[position] != "A" else "B"
        altered = sig[:position] + changed + sig[position + 1 :]
        assert tokens.verify(SECRET, ref, altered, action) is None


@pytest.mark.parametrize("cut", [1, 8, 31, 32])
def test_truncated_sig_is_refused(cut: int) -> None:
    """A signature with characters missing from the end does not verify."""
    ref, sig, action = split(tokens.callback_path(SECRET, tokens.task_ref("t1")))
    assert tokens.verify(SECRET, ref, sig[:-cut], action) is None


def test_extended_sig_is_refused() -> None:
    """A signature with characters added does not verify."""
    ref, sig, action = split(tokens.callback_path(SECRET, tokens.task_ref("t1")))
    assert tokens.verify(SECRET, ref, sig + "A", action) is None


@pytest.mark.parametrize("suffix", ["é", "\u2603", "\ud800", "\x00"])
def test_non_ascii_sig_is_refused(suffix: str) -> None:
    """A signature holding non-ASCII text (or a lone surrogate) is refused, not an error."""
    ref, sig, action = split(tokens.callback_path(SECRET, tokens.task_ref("t1")))
    assert tokens.verify(SECRET, ref, sig[:-1] + suffix, action) is None
    assert tokens.verify(SECRET, ref, suffix * len(sig), action) is None


@pytest.mark.parametrize("ref", ["t1", "x-", "x-..", "x-a/b", "y-t1", "h-../x", "x-" + "a" * 129])
def test_malformed_refs_are_refused(ref: str) -> None:
    """A ref that is not x-<id> or h-<id> with a safe id never verifies, even when signed."""
    path = tokens.callback_path(SECRET, ref)
    sig = path.removeprefix(f"{tokens.CALLBACK_PREFIX}/{ref}/")
    assert tokens.verify(SECRET, ref, sig, None) is None


@pytest.mark.parametrize("action", ["", "videos", "Videos/text2video", "videos/../x", "a/b/c"])
def test_malformed_actions_are_refused(action: str) -> None:
    """An action that is not action/action2 cannot be put in a URL nor verified."""
    ref = tokens.task_ref("t1")
    with pytest.raises(ValueError, match="action must be an old-standard"):
        tokens.callback_path(SECRET, ref, action)
    _, sig, _ = split(tokens.callback_path(SECRET, ref))
    assert tokens.verify(SECRET, ref, sig, action) is None


@pytest.mark.parametrize("external_task_id", ["", "..", "../../etc", "a/b", "a b", "a" * 129])
def test_task_ref_rejects_unsafe_ids(external_task_id: str) -> None:
    """A URL cannot be made for an external_task_id that is not a safe id."""
    with pytest.raises(ValueError, match="unsafe external_task_id"):
        tokens.task_ref(external_task_id)


def test_task_ref_names_its_task() -> None:
    """A task's ref starts with x- and gives back its external_task_id."""
    ref = tokens.task_ref("kr_01JDX3N5Q8")
    assert ref == "x-kr_01JDX3N5Q8"
    assert CallbackRef(ref, None).external_task_id == "kr_01JDX3N5Q8"


def test_channel_refs_are_fresh_and_name_no_task() -> None:
    """Hand-made refs start with h-, differ each time and are bound to no task."""
    refs = {tokens.new_channel_ref() for _ in range(100)}
    assert len(refs) == 100
    for ref in refs:
        assert ref.startswith("h-")
        assert CallbackRef(ref, ACTION).external_task_id is None


def test_verified_task_url_names_its_external_task_id() -> None:
    """The ref that a task URL verifies to tells which external_task_id it was made for."""
    path = tokens.callback_path(SECRET, tokens.task_ref("kr_1"), ACTION)
    verified = tokens.verify(SECRET, *split(path))
    assert verified is not None
    assert verified.external_task_id == "kr_1"
    assert verified.action == ACTION
