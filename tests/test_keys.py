"""Key names and partitioning are a stored schema: pin them."""

import pytest

from tasks.keys import Keys, partition_of


def test_key_names_are_pinned():
    k = Keys("cart-join")
    assert k.meta == "cart-join:meta"
    assert k.checkpoints == "cart-join:checkpoints"
    assert k.driver_lock == "cart-join:driver"
    assert k.notices(7) == "cart-join:notices:7"
    assert k.progress(3) == "cart-join:p3:progress"
    assert k.state(3) == "cart-join:p3:state"
    assert k.undo(3) == "cart-join:p3:undo"
    assert k.lease(3) == "cart-join:p3:lease"
    assert k.dead_letters == "cart-join:dead-letters"
    assert k.backlog == "cart-join:backlog"
    assert k.batch(2, 3, 41) == "cart-join:batch:g2-p3-e41"
    assert k.queue_name(3) == "cart-join-p3"
    assert k.job_id(2, 3, 41) == "cart-join-g2-p3-e41"


def test_partition_is_crc32_of_the_utf8_key():
    # 0xCBF43926 is CRC-32's published check value for "123456789".
    assert partition_of("123456789", 1 << 32) == 0xCBF43926
    assert partition_of("123456789", 16) == 0xCBF43926 % 16
    assert {partition_of(f"u{i}", 4) for i in range(100)} == {0, 1, 2, 3}


@pytest.mark.parametrize("bad", ["", "a:b", "a b", "x" * 65, "ü"])
def test_namespace_names_are_restricted(bad):
    with pytest.raises(ValueError, match="invalid namespace"):
        Keys(bad)
