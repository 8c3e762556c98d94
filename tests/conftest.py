import os

import pytest
import torch

# tiny models: one thread is fastest and keeps the suite steady on a busy 2-core machine
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _names_cache(tmp_path_factory):
    """Build the names corpus cache once per test session, outside the user's cache."""
    if "GPTLAB_CACHE" not in os.environ:
        os.environ["GPTLAB_CACHE"] = str(tmp_path_factory.mktemp("gptlab-cache"))
    yield


def made_up_names(count: int = 300) -> set[str]:
    """Pronounceable consonant-vowel names (about one in five ends with `a`), the same every call."""
    g = torch.Generator().manual_seed(0)
    cons, vow = "bcdfghjklmnprstvz", "aeiou"
    names = set()
    while len(names) < count:
        n = int(torch.randint(2, 5, (1,), generator=g))
        names.add("".join(cons[int(torch.randint(len(cons), (1,), generator=g))] +
                          vow[int(torch.randint(len(vow), (1,), generator=g))] for _ in range(n)))
    return names


@pytest.fixture
def names_file(tmp_path):
    """A small text corpus: 300 pronounceable made-up names, one per line."""
    names = made_up_names()
    p = tmp_path / "names.txt"
    p.write_text("\n".join(sorted(names)) + "\n")
    return p
