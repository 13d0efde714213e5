"""Arena votes in the artifact store: one JSON line each, locally appended or one S3 object each,
read back in order by the same reader, and counted in the leaderboard."""

import pytest

from tasks.arena_store import append_vote, arena_store, current_board, read_votes, write_judge_battles, write_models


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    return str(tmp_path / "artifacts") if request.param == "local" else request.getfixturevalue("s3_bucket") + "/smol"


def test_votes_are_appended_one_line_each_and_counted(root):
    store = arena_store(root)
    write_models(store, [{"key": k, "name": n} for k, n in (("k0", "base"), ("k1", "run 1"))], "k0", ["p"])
    write_judge_battles(store, [{"model_a": "k0", "model_b": "k1", "prompt": "p", "outcome": "tie"}])
    assert current_board(store, rounds=20)["human_votes"] == 0
    for outcome in ("a", "a", "both_bad"):
        append_vote(store, {"prompt": "p", "model_a": "k1", "model_b": "k0", "outcome": outcome})
    append_vote(store, {"prompt": "p", "model_a": "gone", "model_b": "k0", "outcome": "a"})  # a model no longer here
    votes = read_votes(arena_store(root))  # a fresh store: nothing cached in this process
    assert [v["outcome"] for v in votes] == ["a", "a", "both_bad", "a"] and len({v["id"] for v in votes}) == 4
    files = store.list_files("votes")
    assert files == ["human.jsonl"] if not store.is_s3 else len(files) == 4
    board = current_board(store, rounds=20)
    assert board["human_votes"] == 3 and board["judge_battles"] == 1
    ratings = {r["name"]: r["rating"] for r in board["rows"]}
    assert ratings["base"] == 1000.0 and ratings["run 1"] > 1000


def test_the_leaderboard_image_shows_long_model_names_whole():
    """Merged contestants' names run to ~100 characters: they ran off the image's left edge (and the
    axis label off its bottom), which matplotlib's tight_layout only warned about."""
    import io
    import warnings

    import matplotlib.image

    from tasks.arena_store import plot

    names = ["run 20261207-164704-provocative-manticore (promoted) = run 20261206-020000-gentle-otter",
             "run 20261207-164704-brave-lynx", "base: HuggingFaceTB/SmolLM2-135M-Instruct"]
    board = {"anchor": names[2], "rows": [{"name": n, "rating": 1000.0 + 10 * i, "lower": 990.0 + 10 * i,
                                           "upper": 1010.0 + 10 * i} for i, n in enumerate(names)]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layout warning either
        image = matplotlib.image.imread(io.BytesIO(plot(board)), format="png")
    rgb = image[..., :3]
    edges = {"left": rgb[:, :3], "right": rgb[:, -3:], "top": rgb[:3], "bottom": rgb[-3:]}
    cut = [side for side, strip in edges.items() if strip.min() < 0.9]  # anything drawn there was cut off
    assert not cut, f"drawn up to the image's {cut} edge: a label runs off it"
