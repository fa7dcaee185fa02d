"""Key names and partitioning are a stored schema: pin them."""

import pytest

from tasks.keys import LEGACY_SLOTS, SLOTS, Keys, Layout, partition_of


def test_key_names_are_pinned():
    k = Keys("cart-join")
    assert k.meta == "cart-join:meta"
    assert k.checkpoints == "cart-join:checkpoints"
    assert k.driver_lock == "cart-join:driver"
    assert k.dead_letters == "cart-join:dead-letters"
    assert k.backlog == "cart-join:backlog"
    # a partition's keys share its hash tag, which is its RQ queue's name
    assert k.notices(7, 3) == "cart-join:{cart-join-p3}:notices:7"
    assert k.progress(3) == "cart-join:{cart-join-p3}:progress"
    assert k.state(3) == "cart-join:{cart-join-p3}:state"
    assert k.undo(3) == "cart-join:{cart-join-p3}:undo"
    assert k.lease(3) == "cart-join:{cart-join-p3}:lease"
    assert k.probe(3) == "cart-join:{cart-join-p3}:probe"
    assert k.batch(2, 3, 41) == "cart-join:{cart-join-p3}:batch:g2-e41"
    assert k.successor(2, 3) == "cart-join:{cart-join-p3}:next:g2"
    assert k.queue_name(3) == "{cart-join-p3}"
    assert k.queue_key(3) == "rq:queue:{cart-join-p3}"
    assert k.job_id(2, 3, 41) == "cart-join-g2-p3-e41"


def test_the_names_of_a_namespace_made_before_hash_tags_are_pinned_too():
    k = Keys("cart-join", tagged=False)
    assert k.notices(7, 3) == "cart-join:notices:7"
    assert k.progress(3) == "cart-join:p3:progress"
    assert k.state(3) == "cart-join:p3:state"
    assert k.batch(2, 3, 41) == "cart-join:batch:g2-p3-e41"
    assert k.successor(2, 3) == "cart-join:next:g2-p3"
    assert k.queue_name(3) == "cart-join-p3"


@pytest.mark.parametrize("tagged", [True, False])
def test_the_generation_and_the_owner_of_a_key_are_read_from_its_name(tagged):
    k, other = Keys("orders", tagged), Keys("orders-prod", tagged)
    for name in [k.notices(7, 3), k.batch(7, 3, 41), k.batch(7, 0, -1), k.successor(7, 3)]:
        assert k.generation_of(name) == 7
        assert k.owns(name) and not other.owns(name)
    assert k.owns(k.queue_key(3)) and not other.owns(k.queue_key(3))
    assert not k.owns(other.queue_key(3))
    assert k.owns(f"rq:wip:{k.queue_name(3)}") and k.owns(f"rq:job:{k.job_id(7, 3, 41)}")


def test_a_key_hashes_to_a_slot_by_crc32_of_its_utf8_bytes_and_partitions_own_slot_ranges():
    # 0xCBF43926 is CRC-32's published check value for "123456789": slot 0x926 = 2342 of 4096.
    assert SLOTS == 4096
    assert partition_of("123456789", SLOTS, SLOTS) == 2342
    assert partition_of("123456789", 4, SLOTS) == 2  # slots 2048-3071
    assert partition_of("123456789", 3, SLOTS) == 1  # slots 1366-2730
    assert partition_of("123456789", 1, SLOTS) == 0
    assert {partition_of(f"u{i}", 4, SLOTS) for i in range(100)} == {0, 1, 2, 3}


def test_a_namespace_made_before_slots_keeps_crc32_modulo_the_partition_count():
    assert LEGACY_SLOTS == 0
    assert partition_of("123456789", 16, LEGACY_SLOTS) == 0xCBF43926 % 16


@pytest.mark.parametrize("slots", [SLOTS, LEGACY_SLOTS])
@pytest.mark.parametrize("partitions", [1, 3, 4, 16, 4096])
def test_the_router_of_a_layout_agrees_with_partition_of(partitions, slots):
    route = Layout(partitions, slots).router()
    for key in ["a", "123456789", "ü", "\udcff", *[f"user-{i}" for i in range(200)]]:
        raw = key.encode("utf-8", "surrogatepass")
        assert route(raw) == partition_of(key, partitions, slots)


def test_growing_the_partition_count_splits_each_partitions_slot_range():
    # 4 -> 16: the keys of new partition q all come from old partition q // 4
    for i in range(2000):
        key = f"k{i}"
        assert partition_of(key, 16, SLOTS) // 4 == partition_of(key, 4, SLOTS)


@pytest.mark.parametrize("bad", ["", "a:b", "a b", "x" * 65, "ü"])
def test_namespace_names_are_restricted(bad):
    with pytest.raises(ValueError, match="invalid namespace"):
        Keys(bad)
