"""Every shipped config resolves, and says something the built-in quick profile does not."""

from pathlib import Path

import pytest
import yaml

from cluster.config import config_hash, load_yaml, resolve

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))


def test_the_config_folders_are_all_found():
    """The parametrised test below must not pass by finding nothing."""
    dirs = {Path(c).parent.as_posix() for c in CONFIGS}
    assert {"configs/gpu", "configs/gpu/short"} <= dirs, dirs


@pytest.mark.parametrize("rel", CONFIGS)
def test_config_resolves_and_is_not_a_copy_of_the_quick_profile(rel):
    data = load_yaml(ROOT / rel)
    assert "track" in data, f"{rel}: name its track, so `pdbench run` refuses it for another one"
    cfg = resolve(data["track"], data)
    assert config_hash(cfg) != config_hash(resolve(data["track"])), f"{rel} repeats the built-in quick profile: delete it"


def _quick_profile_blocks(doc: str) -> list[dict]:
    blocks = doc.split("```yaml\n")[1:]
    return [yaml.safe_load(b.split("```")[0]) for b in blocks if b.startswith("# quick profile")]


def test_quick_profiles_quoted_in_the_docs_are_the_built_in_ones():
    blocks = _quick_profile_blocks((ROOT / "docs" / "tracks.md").read_text())
    assert {b["track"] for b in blocks} == {"e0", "e3"}
    for b in blocks:
        assert config_hash(resolve(b["track"], b)) == config_hash(resolve(b["track"])), b["track"]
