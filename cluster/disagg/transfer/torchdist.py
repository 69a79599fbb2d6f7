"""KV transport over torch.distributed: NCCL on CUDA, gloo on CPU, one group per pair.

Links are made on demand, not in one static world, so an instance that joins later
gets links without restarting anyone:

  (1) every endpoint runs a small TCPStore server (`listen` -> "host:port");
  (2) to link A and B, the runtime calls connect on both at once: the master side uses
      its own store, the other side dials it; both build a 2-rank process group
      (ProcessGroupNCCL / ProcessGroupGloo) under a prefix unique to the pair and open
      its communicator there and then (one tiny collective), never lazily mid-transfer;
  (3) every message is a fixed-size header [transfer, index, count, dtype, shape...]
      followed by its payload (layer l's K and V for the request's blocks, packed
      [2, num_blocks, block_size, kv_heads, head_dim]; the last message: the first token).
      The *sender's* order is the only order: NCCL matches messages by position, not by
      tag, and a prefill step streams several requests' layers interleaved (A0 B0 A1 B1...)
      in an order the decode side cannot know in advance. So each link has one receiver
      thread that reads a header, then receives the payload it announces into the
      transfer it names (a transfer the decode side gave up on lands in scratch and is
      dropped), then the next header. KV crosses a link one way: the receiving side's
      thread starts at its first `expect`, and the sending side never posts a receive.
      Headers travel on a gloo group of the pair (host memory), payloads on the device
      group: a receive is posted on the GPU only once its header says the payload is on
      its way. An NCCL receive left posted while nothing comes would spin on the GPU
      forever, and any device-wide wait in that process (a cudaFree, a synchronize)
      would hang behind it (the first 2xH200 runs did exactly that). On NCCL a payload is
      a broadcast rooted at the sender (the pair's own communicator, opened at connect;
      unbatched send/recv would make a second one lazily); on gloo a send/recv with one
      tag (FIFO per peer);
  (4) sender side: NCCL payload sends are counted done by whoever asks `send_state` (the
      engine's loop polls its transfers every step), looking at each link's sends in the order
      they were posted (they complete in that order); a send past its deadline fails the link.
      Gloo's handles only complete inside wait(), so gloo sends, and every link's manifests, go
      to one waiter thread per link that blocks in wait() with the GIL released. NCCL's sends
      are not given to that thread: measured, a thread polling them doubled the host time of the
      gather before each post and of the post on one H200, and moved a request's KV at 48% of
      raw NCCL against 54% caller-polled on 2xH200 (docs/benchmark-history.md, 2026-12-01 run 10);
  (5) every transfer's state (trackers, the early arrivals, the ids given up on) is kept by a
      `TransferBook` (book.py), which the links' threads and the engine's thread share;
  (6) a dead peer shows up as an error on the link (gloo: its closed socket) or as a
      transfer timing out; the transfer FAILS and the caller recomputes; `disconnect`
      aborts the group and fails what was in flight on it.
"""
from __future__ import annotations

import contextlib
import datetime
import threading
import time

import torch
from torch._C._distributed_c10d import AllreduceOptions

from cluster.disagg.transfer.base import KVTransport, TransferState
from cluster.disagg.transfer.book import TransferBook
from cluster.disagg.transfer.link import (HEADER_LEN, LINK_GROUP_TIMEOUT_S, Link, decode_header, encode_header,
                                          small_on_host)
from cluster.parallel.groups import dial_store, pair_group, serve_store
from cluster.platform import bind_thread

class TorchDistTransport(KVTransport):
    def __init__(self, endpoint_id: str, host: str = "127.0.0.1", backend: str = "gloo", timeout_s: float = 10.0,
                 device: torch.device | None = None):
        """`device`: the engine's GPU for NCCL links (default: the creating thread's current device;
        `connect` may run on another thread, whose current device is GPU 0)."""
        self.endpoint_id = endpoint_id
        self.device = device if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu"))
        self.host = host
        self.backend = backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.store = None
        self.links: dict[str, Link] = {}
        self.epochs: dict[str, int] = {}
        self.lock = threading.Lock()  # the links
        self.book = TransferBook(timeout_s, self._notify)  # every transfer's state (book.py)
        self.bytes_received = 0

    # -- links -----------------------------------------------------------------
    def listen(self) -> str:
        if self.store is None:
            self.store = serve_store(self.host, 0, None, self.timeout.total_seconds())
            self.address = f"{self.host}:{self.store.port}"
        return self.address

    def connect(self, peer_id: str, address: str, is_master: bool, link_key: str | None = None) -> None:
        """Both sides call this (concurrently); `address` is the master side's listen(). The pair's groups
        live under `link_key` in the master's store: the caller's, the same on both sides (a router that
        took over from another, or a side whose last connect failed alone, cannot count alike), else
        each side's count of its connects to the peer."""
        host, port = address.rsplit(":", 1)
        store = self.store if is_master else dial_store(host, int(port), None, self.timeout.total_seconds())
        pair = "/".join(sorted([self.endpoint_id, peer_id]))
        epoch = self.epochs[peer_id] = self.epochs.get(peer_id, 0) + 1
        key = f"link/{pair}/" + (f"key-{link_key}" if link_key else str(epoch))
        my_rank = 0 if is_master else 1
        group = pair_group(store, key, my_rank, self.backend, LINK_GROUP_TIMEOUT_S, self.host)
        control = pair_group(store, f"{key}/control", my_rank, "gloo", LINK_GROUP_TIMEOUT_S, self.host)
        device = self.device if self.backend == "nccl" else torch.device("cpu")
        bind_thread(device)  # NCCL opens the communicator on the calling thread's current device
        probe = torch.zeros(1, device=device)
        group.allreduce([probe], AllreduceOptions()).wait()  # opens the communicator now, both sides present
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        link = Link(peer_id, group, control, my_rank, self.backend, device)
        with self.lock:
            old = self.links.get(peer_id)
            self.links[peer_id] = link
        if old is not None:
            self._close(old, "replaced by a new link")

    def _use(self, link: Link, direction: str) -> None:
        """KV crosses a link one way, from the side that sends to the side that expects. The
        receiving side's thread starts at its first `expect`; the sending side never posts a
        receive (on NCCL a receive is a broadcast rooted at the peer, which would pair up with
        this side's own sends and hang both)."""
        if link.direction == direction:
            return
        with self.lock:
            if link.direction is None:
                link.direction = direction
                loop = self._receive_loop if direction == "recv" else self._send_waiter
                threading.Thread(target=loop, args=(link,), daemon=True, name=f"kv-{direction}-{link.peer_id}").start()
        if link.direction != direction:
            raise RuntimeError(f"the link to {link.peer_id} carries KV the other way ({link.direction})")

    def has_link(self, peer_id: str) -> bool:
        link = self.links.get(peer_id)
        return link is not None and not link.closed

    def disconnect(self, peer_id: str) -> None:
        with self.lock:
            link = self.links.pop(peer_id, None)
        if link is not None:
            self._close(link, f"link to {peer_id} was torn down")
        else:
            self._fail_peer(peer_id, f"link to {peer_id} was torn down")

    def _close(self, link: Link, why: str) -> None:
        link.closed = True
        link.sent.put(None)
        link.posted.clear()
        link.error = link.error or why
        self._fail_peer(link.peer_id, why)
        pending = link.current
        if pending is not None and hasattr(pending, "abort"):
            try:
                pending.abort()
            except RuntimeError:
                pass
        if link.backend == "nccl" and hasattr(link.group, "abort"):
            link.group.abort()

    def _fail_peer(self, peer_id: str, why: str) -> None:
        self.book.fail_peer(peer_id, why)

    def _notify(self) -> None:
        if self.on_ready is not None:
            self.on_ready()

    def close(self) -> None:
        for peer_id in list(self.links):
            self.disconnect(peer_id)

    # -- sender ------------------------------------------------------------------
    def announce(self, peer_id, messages) -> None:
        """Tell the peer which messages come next, in the order they will be sent: one host
        message per prefill step, however many layers and requests it streams. The receiver
        posts every receive of the manifest at once and waits once per transfer, so its thread
        needs the GIL a few times a step, not several times a layer."""
        link = self.links.get(peer_id)
        if link is None or link.closed or not messages:
            return  # send_layer fails the transfers
        headers = [encode_header(*message) for message in messages]
        manifest = torch.tensor(headers, dtype=torch.int64)
        size = torch.tensor([len(headers)], dtype=torch.int64)
        self._use(link, "send")
        try:
            with self.lock:
                link.announced.extend(tuple(h) for h in headers)
                deadline = time.monotonic() + self._send_timeout_s()
                link.sent.put((None, link.control.send([size], link.peer_rank, 0), "gloo", size, deadline))
                link.sent.put((None, link.control.send([manifest], link.peer_rank, 0), "gloo", manifest, deadline))
        except RuntimeError as exc:  # the peer is gone (gloo raises at once on a closed pair): its transfers
            self._close(link, f"announcing to {peer_id} failed: {exc}")  # fail; this instance serves on

    def send_layer(self, peer_id, transfer_id, layer_id, num_layers, kv):
        """Post one message; it must be the next one announced (or it is announced alone now). Returns
        the send's work (NCCL: its wait() orders the current stream after it), None if it failed."""
        tracker = self.book.sender(transfer_id, peer_id, num_layers)
        link = self.links.get(peer_id)
        if link is None or link.closed:
            self.book.fail(tracker, f"no link to {peer_id}" if link is None else link.error)
            return None
        kv = kv.contiguous()
        try:
            if not link.announced:
                self.announce(peer_id, [(transfer_id, layer_id, num_layers, tuple(kv.shape), kv.dtype)])
            announced = decode_header(link.announced.popleft())
            if announced != (transfer_id, layer_id, num_layers, tuple(kv.shape), kv.dtype):
                raise RuntimeError(f"message {layer_id} of transfer {transfer_id} ({kv.dtype}{list(kv.shape)}) is not "
                                   f"the one announced next {announced}; the link is out of step")
            work = link.post(kv, sending=True)
        except (RuntimeError, ValueError) as exc:
            self.book.fail(tracker, str(exc))
            if "out of step" in str(exc):
                self._close(link, str(exc))
            return None
        with tracker.cond:
            if tracker.state == TransferState.WAITING:
                tracker.state = TransferState.TRANSFERRING
        item = (tracker, work, link.backend, kv, time.monotonic() + self._send_timeout_s())
        if link.backend == "nccl":
            link.posted.append(item)  # looked at by `send_state`, on the caller's thread (4)
        else:
            link.sent.put(item)
        return work

    def send_state(self, transfer_id) -> TransferState:
        self._reap_sends()
        return self.book.state(transfer_id)

    def _reap_sends(self) -> None:
        """(4): count every link's NCCL sends done so far (they complete in the order they were
        posted); a send past its deadline fails its link."""
        now = time.monotonic()
        for link in list(self.links.values()):
            while not link.closed:
                try:  # (`_close` on another thread may empty it meanwhile)
                    tracker, work, _kind, _tensor, deadline = link.posted[0]
                except IndexError:
                    break
                if work.is_completed():
                    try:
                        link.posted.popleft()
                    except IndexError:
                        break
                    self.book.sent_one(tracker)
                elif now > deadline:
                    link.error = f"link to {link.peer_id} failed: an NCCL send not completed by its deadline"
                    self._close(link, link.error)
                else:
                    break

    # -- receiver ------------------------------------------------------------------
    def expect(self, peer_id, transfer_id, specs, device) -> None:
        tracker = self.book.expect(peer_id, transfer_id, specs)
        link = self.links.get(peer_id)
        if link is None or link.closed:
            self.book.fail(tracker, f"no link to {peer_id}" if link is None else link.error)
            return
        try:
            self._use(link, "recv")
        except RuntimeError as exc:
            self.book.fail(tracker, str(exc))

    def recv_state(self, transfer_id) -> TransferState:
        return self.send_state(transfer_id)

    def take(self, transfer_id) -> list[torch.Tensor]:
        return self.book.take(transfer_id)

    def forget(self, transfer_id) -> None:
        self.book.forget(transfer_id)

    def error(self, transfer_id) -> str | None:
        return self.book.error(transfer_id)

    def _send_waiter(self, link: Link) -> None:
        """Sender side, one thread per link: wait on the link's gloo sends (payloads on a gloo link,
        manifests on any) in the order they were posted (they complete in that order) and count each
        transfer's messages done. One thread a link, not one a transfer: a busy prefill instance has
        many transfers in flight, and every thread that wakes up takes the GIL from the engine's loop."""
        while True:
            item = link.sent.get()
            if item is None:
                return
            tracker, work, _kind, _tensor, _deadline = item  # the tensor is held until its send is done
            try:
                work.wait()  # blocks with the GIL released; a dead peer raises
            except Exception as exc:
                if not link.closed:
                    link.error = f"link to {link.peer_id} failed: {type(exc).__name__}: {exc}"
                    self._close(link, link.error)
                return
            if tracker is not None:
                self.book.sent_one(tracker)

    def _send_timeout_s(self) -> float:
        return self.timeout.total_seconds() * 3

    def _receive_loop(self, link: Link) -> None:
        """The link's receiver: a manifest, then every payload it announces, for as long as the link lives."""
        stream = None
        if link.device.type == "cuda":
            bind_thread(link.device)
            stream = torch.cuda.Stream(link.device)  # never waits behind the engine's compute
        size = torch.empty(1, dtype=torch.int64)
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                while not link.closed:
                    link.control_recv(size)  # host memory only: nothing is posted on the device while idle
                    manifest = torch.empty(int(size.item()), HEADER_LEN, dtype=torch.int64)
                    link.control_recv(manifest)
                    self._receive_manifest(link, manifest.tolist())
        except Exception as exc:  # the peer died or the link was aborted: everything in flight on it fails
            if not link.closed:
                link.error = f"link to {link.peer_id} failed: {type(exc).__name__}: {exc}"
                link.closed = True
            self._fail_peer(link.peer_id, link.error)

    def _receive_manifest(self, link: Link, headers: list[list[int]]) -> None:
        """Post a receive for every announced payload (the sender posts its sends as the layers are
        computed), then wait for them in order, landing each transfer as its last message arrives."""
        posted = []
        for header in headers:
            transfer_id, index, count, shape, dtype = decode_header(header)
            tracker = self.book.receiving(link.peer_id, transfer_id, count)
            error = self.book.announced(tracker, transfer_id, count, shape, dtype) if tracker is not None else None
            if error:
                self.book.fail(tracker, error)
            payload = torch.empty(shape, dtype=dtype, device=link.device)  # scratch if nobody expects it
            link.current = link.post(payload, sending=False)
            posted.append((transfer_id, index, payload, link.current, tracker))
        last_of = {transfer_id: i for i, (transfer_id, *_rest) in enumerate(posted)}
        for i, (transfer_id, index, payload, work, tracker) in enumerate(posted):
            if link.closed:
                raise RuntimeError(link.error or "link closed")
            work.wait()  # gloo: blocks (GIL released); NCCL: this thread's stream waits for it
            self.bytes_received += payload.numel() * payload.element_size()
            if last_of[transfer_id] != i:
                continue
            if payload.is_cuda:
                torch.cuda.current_stream().synchronize()  # this transfer's payloads are all complete
            if tracker is not None:
                for tid, idx, buf, _, _ in posted[: i + 1]:
                    if tid == transfer_id:
                        self.book.landed(tracker, transfer_id, idx, small_on_host(buf))
        link.current = None
