"""The note a run on a warm cluster leaves for the next about the trial workers it started
(mlkube.training.trial_workers): counted on once, for the same runtime environment, while
the raylet still keeps them."""

from __future__ import annotations

from pathlib import Path

from mlkube.training.trial_workers import AHEAD_MARGIN_SECONDS, take_ahead_note, write_ahead_note

NOW = 1_000_000.0


def test_the_next_run_of_the_same_environment_counts_on_them_once(tmp_path: Path) -> None:
    note = tmp_path / "ahead.json"
    write_ahead_note(note, "env-a", NOW + 900)

    assert take_ahead_note(note, "env-a", NOW)
    assert not take_ahead_note(note, "env-a", NOW)  # a second run starts its own
    assert list(tmp_path.iterdir()) == []


def test_another_environment_or_workers_about_to_go_start_their_own(tmp_path: Path) -> None:
    note = tmp_path / "ahead.json"
    write_ahead_note(note, "env-a", NOW + 900)
    assert not take_ahead_note(note, "env-b", NOW)
    assert not note.exists()  # whatever was left is not counted on again

    write_ahead_note(note, "env-a", NOW + AHEAD_MARGIN_SECONDS)
    assert not take_ahead_note(note, "env-a", NOW)


def test_no_note_or_a_broken_one_counts_for_nothing(tmp_path: Path) -> None:
    note = tmp_path / "ahead.json"
    assert not take_ahead_note(note, "env-a", NOW)
    note.write_text("{not json")
    assert not take_ahead_note(note, "env-a", NOW)
    note.write_text("[1, 2]")
    assert not take_ahead_note(note, "env-a", NOW)
