"""KV transports: real two-process gloo links made on demand, polled, failing fast."""
from __future__ import annotations

import multiprocessing as mp
import time

import torch

from cluster.disagg.transfer.base import TransferState
from cluster.disagg.transfer.loopback import LoopbackHub, LoopbackTransport
from cluster.disagg.transfer.torchdist import TorchDistTransport

SHAPE = (2, 3, 4, 2, 8)
LAYERS = 3


def _poll(fn, transfer_id, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = fn(transfer_id)
        if state in (TransferState.DONE, TransferState.FAILED):
            return state
        time.sleep(0.005)
    raise AssertionError("transfer neither finished nor failed")


def _layer(transfer_id, layer):
    return torch.full(SHAPE, float(transfer_id * 10 + layer))


def _prefill_side(address_q, result_q, die_after_layers):
    t = TorchDistTransport("prefill-0", timeout_s=3.0)
    address = address_q.get()
    t.connect("decode-0", address, is_master=False)
    for transfer_id in (1, 2):
        for layer in range(LAYERS):
            if transfer_id == 2 and layer == die_after_layers:
                result_q.put("dying")
                result_q.close()
                result_q.join_thread()  # flush before dying abruptly
                import os

                os._exit(0)  # a prefill instance killed mid-transfer
            t.send_layer("decode-0", transfer_id, layer, LAYERS, _layer(transfer_id, layer))
        result_q.put(_poll(t.send_state, transfer_id).value)


def test_two_process_gloo_link_streams_layers_and_detects_a_dead_peer():
    ctx = mp.get_context("spawn")
    address_q, result_q = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_prefill_side, args=(address_q, result_q, 1), daemon=True)
    proc.start()
    decode = TorchDistTransport("decode-0", timeout_s=3.0)
    address_q.put(decode.listen())
    decode.connect("prefill-0", decode.listen(), is_master=True)
    decode.expect("prefill-0", 1, [(SHAPE, torch.float32)] * LAYERS, torch.device("cpu"))
    decode.expect("prefill-0", 2, [(SHAPE, torch.float32)] * LAYERS, torch.device("cpu"))
    assert _poll(decode.recv_state, 1) == TransferState.DONE
    layers = decode.take(1)
    assert all(torch.equal(layers[i], _layer(1, i)) for i in range(LAYERS))
    assert result_q.get(timeout=10) == "done"
    assert result_q.get(timeout=10) == "dying"
    t0 = time.monotonic()
    assert _poll(decode.recv_state, 2) == TransferState.FAILED  # the peer died after one layer
    assert time.monotonic() - t0 < 8
    proc.join(timeout=10)


def test_loopback_transport_round_trip():
    hub = LoopbackHub()
    a, b = LoopbackTransport(hub), LoopbackTransport(hub)
    a.connect("b", b.listen(), False)
    b.connect("a", a.listen(), True)
    b.expect("a", 5, [(SHAPE, torch.float32)] * 2, torch.device("cpu"))
    assert b.recv_state(5) == TransferState.WAITING
    a.send_layer("b", 5, 0, 2, _layer(5, 0))
    assert b.recv_state(5) == TransferState.TRANSFERRING
    a.send_layer("b", 5, 1, 2, _layer(5, 1))
    assert b.recv_state(5) == TransferState.DONE and a.send_state(5) == TransferState.DONE
    assert torch.equal(b.take(5)[1], _layer(5, 1))


def _decode_side_of(sender, decode_id: str, prefill_id: str):
    """A receiving transport here, linked to `sender(address_q, result_q)` run in a spawned process."""
    ctx = mp.get_context("spawn")
    address_q, result_q = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=sender, args=(address_q, result_q), daemon=True)
    proc.start()
    decode = TorchDistTransport(decode_id, timeout_s=5.0)
    address_q.put(decode.listen())
    decode.connect(prefill_id, decode.listen(), is_master=True)
    return decode, result_q, proc


def _interleaving_sender(address_q, result_q):
    t = TorchDistTransport("prefill-1", timeout_s=5.0)
    t.connect("decode-1", address_q.get(), is_master=False)
    # one prefill step streams three requests layer-major: 7/0 8/0 9/0 7/1 8/1 9/1 ...
    for layer in range(LAYERS):
        for transfer_id in (7, 8, 9):
            t.send_layer("decode-1", transfer_id, layer, LAYERS, _layer(transfer_id, layer))
    result_q.put([_poll(t.send_state, i).value for i in (7, 8, 9)])
    # then a transfer whose shape the decode side did not reserve for
    t.send_layer("decode-1", 10, 0, 1, torch.zeros(2, 2))
    result_q.put(_poll(t.send_state, 10).value)
    time.sleep(1.0)


def test_the_senders_order_wins_and_abandoned_or_mismatched_transfers_do_not_desync_the_link():
    """NCCL matches messages by position, not tag: the receiver must follow the sender's
    interleaving, drop what it gave up on, and reject a message of the wrong shape."""
    decode, result_q, proc = _decode_side_of(_interleaving_sender, "decode-1", "prefill-1")
    cpu = torch.device("cpu")
    decode.expect("prefill-1", 9, [(SHAPE, torch.float32)] * LAYERS, cpu)  # reserved in another order
    decode.expect("prefill-1", 8, [(SHAPE, torch.float32)] * LAYERS, cpu)
    decode.expect("prefill-1", 7, [(SHAPE, torch.float32)] * LAYERS, cpu)
    decode.forget(8)  # the decode side gave up on 8 (its messages still arrive)
    decode.expect("prefill-1", 10, [((3, 3), torch.float32)], cpu)
    for transfer_id in (9, 7):
        assert _poll(decode.recv_state, transfer_id) == TransferState.DONE
        layers = decode.take(transfer_id)
        assert all(torch.equal(layers[i], _layer(transfer_id, i)) for i in range(LAYERS))
    assert result_q.get(timeout=10) == ["done", "done", "done"]
    assert _poll(decode.recv_state, 10) == TransferState.FAILED
    assert "expected" in decode.error(10)
    assert result_q.get(timeout=10) == "done"
    proc.join(timeout=10)


def _out_of_step_sender(address_q, result_q):
    t = TorchDistTransport("prefill-2", timeout_s=5.0)
    t.connect("decode-2", address_q.get(), is_master=False)
    t.announce("decode-2", [(21, 0, 2, SHAPE, torch.float32), (21, 1, 2, SHAPE, torch.float32)])
    t.send_layer("decode-2", 21, 0, 2, _layer(21, 0))
    t.send_layer("decode-2", 21, 1, 2, torch.zeros(3))  # not what was announced
    result_q.put((t.send_state(21).value, t.error(21), t.has_link("decode-2")))
    time.sleep(1.0)


def test_a_message_other_than_the_announced_one_fails_its_transfer_and_closes_the_link():
    """The receiver posts what the manifest says; a sender that strays would desynchronise the
    link (on NCCL: hang it), so the transfer fails at once and the link is dropped instead."""
    decode, result_q, proc = _decode_side_of(_out_of_step_sender, "decode-2", "prefill-2")
    decode.expect("prefill-2", 21, [(SHAPE, torch.float32)] * 2, torch.device("cpu"))
    state, error, has_link = result_q.get(timeout=10)
    assert state == "failed" and "announced" in error and not has_link
    assert _poll(decode.recv_state, 21) == TransferState.FAILED  # its peer dropped the link
    proc.join(timeout=10)


def _early_sender(address_q, result_q):
    t = TorchDistTransport("prefill-3", timeout_s=5.0)
    t.connect("decode-3", address_q.get(), is_master=False)
    for transfer_id in (19, 20, 21):  # 20 and 21 go before the decode side expects them
        for layer in range(LAYERS):
            t.send_layer("decode-3", transfer_id, layer, LAYERS, _layer(transfer_id, layer))
    result_q.put([_poll(t.send_state, i).value for i in (19, 20, 21)])
    time.sleep(1.0)


def test_messages_before_their_expect_wait_for_it_and_are_checked_against_it():
    """The router starts a prefill while the decode side reserves: KV may come before `expect`."""
    decode, result_q, proc = _decode_side_of(_early_sender, "decode-3", "prefill-3")
    cpu = torch.device("cpu")
    decode.expect("prefill-3", 19, [(SHAPE, torch.float32)] * LAYERS, cpu)
    assert _poll(decode.recv_state, 19) == TransferState.DONE
    assert result_q.get(timeout=10) == ["done", "done", "done"]  # all of 20 and 21 landed, unexpected
    assert set(decode.book.early) == {20, 21}
    decode.expect("prefill-3", 20, [(SHAPE, torch.float32)] * LAYERS, cpu)
    assert _poll(decode.recv_state, 20) == TransferState.DONE
    layers = decode.take(20)
    assert all(torch.equal(layers[i], _layer(20, i)) for i in range(LAYERS))
    decode.expect("prefill-3", 21, [((3, 3), torch.float32)] * LAYERS, cpu)  # not what came
    assert _poll(decode.recv_state, 21) == TransferState.FAILED and "expected" in decode.error(21)
    assert not decode.book.early
    proc.join(timeout=10)


def _stacking_sender(address_q, result_q):
    t = TorchDistTransport("prefill-4", timeout_s=5.0)
    t.connect("decode-4", address_q.get(), is_master=False)
    stacked = torch.stack([_layer(30, 0), _layer(30, 1)])
    # 30: layers 0-1 stacked in one message, then layer 2: fits the three layers reserved
    t.send_layer("decode-4", 30, 0, 2, stacked)
    t.send_layer("decode-4", 30, 1, 2, _layer(30, 2))
    # 31: all three stacked, sent before the decode side expects it (checked when it does)
    t.send_layer("decode-4", 31, 0, 1, torch.stack([_layer(31, i) for i in range(LAYERS)]))
    # 32: two of three layers, then nothing: short of what was reserved
    t.send_layer("decode-4", 32, 0, 1, torch.stack([_layer(32, 0), _layer(32, 1)]))
    # 33: stacked layers of another shape
    t.send_layer("decode-4", 33, 0, 1, torch.zeros(LAYERS, 3, 3))
    result_q.put([_poll(t.send_state, i).value for i in (30, 31, 32, 33)])
    time.sleep(1.0)


def test_a_sender_may_stack_consecutive_layers_in_one_message():
    """A multi-rank prefill has every layer ready after its step and sends them stacked (one post
    per group, not per layer): the receiver takes [k, *layer] as k expected messages, checked in
    order, before or after `expect`; a transfer that covers less, or other shapes, fails."""
    decode, result_q, proc = _decode_side_of(_stacking_sender, "decode-4", "prefill-4")
    cpu = torch.device("cpu")
    layers = [(SHAPE, torch.float32)] * LAYERS
    for transfer_id in (30, 32, 33):
        decode.expect("prefill-4", transfer_id, layers, cpu)
    assert _poll(decode.recv_state, 30) == TransferState.DONE
    got = decode.take(30)
    assert len(got) == 2 and got[0].shape == (2, *SHAPE)
    assert all(torch.equal(layer, _layer(30, i)) for i, layer in enumerate([*got[0].unbind(0), got[1]]))
    assert result_q.get(timeout=10) == ["done"] * 4
    decode.expect("prefill-4", 31, layers, cpu)  # its message came first
    assert _poll(decode.recv_state, 31) == TransferState.DONE
    assert torch.equal(decode.take(31)[0][2], _layer(31, 2))
    assert _poll(decode.recv_state, 32) == TransferState.FAILED and "ended after 2 of the 3" in decode.error(32)
    assert _poll(decode.recv_state, 33) == TransferState.FAILED and "stacked" in decode.error(33)
    proc.join(timeout=10)


class _NcclWork:
    """Stands in for an NCCL send's work handle (NCCL cannot run on this CPU machine): done when told."""

    def __init__(self):
        self.done = False

    def is_completed(self) -> bool:
        return self.done


def test_caller_polled_nccl_sends_complete_in_order_and_fail_their_link_past_the_deadline():
    """NCCL payloads are counted by whoever asks `send_state` (no second thread polls them): a
    transfer is done once all its sends are, in posting order, and a send past its deadline fails
    the link and every transfer on it."""
    from cluster.disagg.transfer.link import Link

    transport = TorchDistTransport("P", backend="gloo")
    link = transport.links["D"] = Link("D", group=None, control=None, my_rank=1, backend="nccl",
                                       device=torch.device("cpu"))
    works = [_NcclWork() for _ in range(3)]
    first = transport.book.sender(1, "D", 2)
    second = transport.book.sender(2, "D", 1)
    far = time.monotonic() + 60
    for tracker, work in ((first, works[0]), (first, works[1]), (second, works[2])):
        link.posted.append((tracker, work, "nccl", None, far))
    assert transport.send_state(1) == TransferState.WAITING
    works[0].done = works[2].done = True  # the third is done, but counted only after the second
    assert transport.send_state(1) == TransferState.WAITING and transport.send_state(2) == TransferState.WAITING
    works[1].done = True
    assert transport.send_state(1) == TransferState.DONE and transport.send_state(2) == TransferState.DONE
    late = transport.book.sender(3, "D", 1)
    link.posted.append((late, _NcclWork(), "nccl", None, time.monotonic() - 1))  # past its deadline
    assert transport.send_state(3) == TransferState.FAILED
    assert link.closed and "deadline" in link.error and not link.posted
