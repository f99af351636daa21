import pytest

from lpq.algorithms.sensitivity import choose_protected, plot_sensitivity


def test_choose_protected_takes_the_largest_increases():
    scores = {0: 0.5, 1: 0.01, 2: 0.2, 3: 0.5, 4: -0.1}
    assert choose_protected(scores, 2) == [0, 3]
    assert choose_protected(scores, 0) == []
    assert choose_protected(scores, 9) == [0, 3, 2, 1, 4]
    with pytest.raises(ValueError):
        choose_protected(scores, -1)


def test_plot_writes_a_png(tmp_path):
    p = tmp_path / "s.png"
    plot_sensitivity({0: 0.3, 1: 0.1, 2: 0.2}, [0], p)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
