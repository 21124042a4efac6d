"""A campaign's rendered rows reach the suppression check in bounded batches, taken lazily:
rows with a large attachment are never all held at once (``merge.suppressing.batches``)."""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import given
from hypothesis import strategies as st

from twistmail.merge.suppressing import SCREEN_BYTES, batches


def test_a_batch_ends_at_its_row_count_or_once_its_bytes_reach_the_limit() -> None:
    assert list(batches(range(7), lambda _: 1, rows=3, limit=100)) == [[0, 1, 2], [3, 4, 5], [6]]
    sizes = [40, 70, 10, 10, 200, 5]
    assert list(batches(sizes, lambda n: n, rows=100, limit=100)) == [[40, 70], [10, 10, 200], [5]]
    assert list(batches([], lambda n: n)) == []


def test_rows_are_taken_only_as_batches_are_asked_for() -> None:
    taken: list[int] = []

    def rendered() -> Iterator[int]:
        for row in range(1000):
            taken.append(row)
            yield row

    # 840 KB a row (a 600 KB attachment, base64): about ten rows a batch, not the CSV's chunk.
    each = 840 * 1024
    first = next(batches(rendered(), lambda _: each))
    assert len(first) == -(-SCREEN_BYTES // each)
    assert len(taken) == len(first)


@given(st.lists(st.integers(min_value=0, max_value=50)), st.integers(1, 10), st.integers(1, 80))
def test_every_item_once_in_order_and_each_batch_within_its_bounds(
    sizes: list[int], rows: int, limit: int
) -> None:
    made = list(batches(sizes, lambda n: n, rows=rows, limit=limit))
    assert [n for batch in made for n in batch] == sizes
    for batch in made:
        assert 1 <= len(batch) <= rows
        assert sum(batch[:-1]) < limit  # only the last item may take a batch over the limit
