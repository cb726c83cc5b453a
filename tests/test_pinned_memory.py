import torch

from longcat_train.pinned_memory import ALIGN, PinnedArena


def test_cuts_are_exact_disjoint_and_reused_after_rewind():
    arena = PinnedArena(pin=False)
    a = arena.empty((3, 1000), torch.bfloat16)
    b = arena.empty((5,), torch.float32)
    assert a.shape == (3, 1000) and a.dtype == torch.bfloat16 and a.is_contiguous()
    a.fill_(1.0)
    b.fill_(2.0)
    assert torch.all(a == 1.0)  # b does not overlap a
    # 6,000 bytes take a page-rounded 8 KiB slab; the next cut opens a slab twice that size
    assert [s.numel() for s in arena.slabs] == [8192, 16384]
    arena.rewind()
    c = arena.empty((3, 1000), torch.bfloat16)
    d = arena.empty((5,), torch.float32)
    assert (c.data_ptr(), d.data_ptr()) == (a.data_ptr(), b.data_ptr())
    assert arena.reserved_bytes == 8192 + 16384


def test_slabs_grow_geometrically_and_large_requests_get_their_own():
    arena = PinnedArena(pin=False)
    sizes = [ALIGN] * 3
    for n in sizes:
        arena.empty((n,), torch.uint8)
    assert [s.numel() for s in arena.slabs] == [ALIGN, 2 * ALIGN]
    big = arena.empty((10 * ALIGN + 1,), torch.uint8)
    assert arena.slabs[-1].numel() == 16 * ALIGN and big.numel() == 10 * ALIGN + 1
    # the same sequence after a rewind lands in the same places: nothing new is reserved
    reserved = arena.reserved_bytes
    arena.rewind()
    for n in sizes:
        arena.empty((n,), torch.uint8)
    assert arena.empty((10 * ALIGN + 1,), torch.uint8).data_ptr() == big.data_ptr()
    assert arena.reserved_bytes == reserved


def test_a_slab_tail_too_small_for_one_request_takes_a_later_one():
    arena = PinnedArena(pin=False)
    arena.empty((3 * ALIGN,), torch.uint8)  # slab 0 (4 pages): one page left
    arena.empty((2 * ALIGN,), torch.uint8)  # does not fit there: slab 1 (8 pages)
    tail = arena.empty((ALIGN,), torch.uint8)  # fits the first slab's last page
    assert [s.numel() for s in arena.slabs] == [4 * ALIGN, 8 * ALIGN]
    assert tail.data_ptr() == arena.slabs[0].data_ptr() + 3 * ALIGN


def test_reserved_for_predicts_what_an_arena_reserves():
    requests = [3 * ALIGN + 5, 17, 9 * ALIGN, 2 * ALIGN, 40 * ALIGN, ALIGN] * 3
    arena = PinnedArena(pin=False)
    for n in requests:
        arena.empty((n,), torch.uint8)
    assert PinnedArena.reserved_for(requests) == arena.reserved_bytes > sum(requests)


def test_a_reserved_arena_cuts_the_same_requests_without_growing():
    requests = [3 * ALIGN + 5, 17, 9 * ALIGN, 2 * ALIGN, 40 * ALIGN, ALIGN] * 3
    grown = PinnedArena(pin=False)
    for n in requests:
        grown.empty((n,), torch.uint8)
    reserved = PinnedArena(pin=False)
    reserved.reserve(requests)
    slabs = [s.data_ptr() for s in reserved.slabs]
    assert reserved.reserved_bytes == grown.reserved_bytes
    for n in requests:
        reserved.empty((n,), torch.uint8)
    assert [s.data_ptr() for s in reserved.slabs] == slabs  # no slab added or replaced
    assert [s.numel() for s in reserved.slabs] == [s.numel() for s in grown.slabs]
    reserved.reserve(requests[:2])  # an arena that holds slabs already is left as it is
    assert [s.data_ptr() for s in reserved.slabs] == slabs
