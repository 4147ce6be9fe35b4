"""Iteration-level batching for Llama 3.2 Vision in this process.

transformers' own continuous batching (``generate_batch``) takes text only, so
llamascope runs its own decode loop over the real Mllama classes, as vLLM and
SGLang schedule: a request joins the running batch at a token boundary (it is
prefilled alone, at most ``prefill_chunk`` prompt tokens between two decode
steps, then its key/value cache is merged into the batch, left-padded to the
batch's length) and leaves it the step it finishes or is cancelled, while the
others go on. Each request samples with its own settings and its own
random generator, and streams on its own.

Requests with an image and requests without one run in separate batches: a text-only
request skips the cross-attention layers entirely, which one forward pass over a
mixed batch cannot do, and padding it with an empty image changes its output. A
greedy request gives the same tokens batched as alone (tests check it).

One thread runs the model; the event loop only hands requests in and reads
token ids out. Everything here but ``submit``, ``stop`` and the line-images
thread (below) runs on that thread.

Bounds: at most ``max_batch`` requests run at once and their prompt plus the
tokens they may still make stay within ``max_batch_tokens``; requests wait for
a place while what they hold fits in ``max_queued_bytes`` (and, if set, while
fewer than ``max_queued`` wait; beyond: ``429 Throttling`` with Retry-After),
and a request that waits longer than ``max_queue_wait`` gets
``408 RequestTimeOut``. So the engine never holds more work than it was sized for.

Background requests (batch lines, ``Sequence.background``) wait in a queue of their own: one is admitted only
when no interactive request waits, and never to the batch's last free place (an interactive request that
comes finds one). They are not counted in the bounds interactive requests are refused by (their number is
bounded by whoever sends them: the batch runner's lines in flight), and have no ``max_queue_wait``: they are
there to wait for idle capacity.

On the CPU, a batch line's images go through the vision tower on a thread of their own while the line waits
(``_encode_lines``), not in its prefill on the model thread: that call is most of a prefill's time (the built-in
model: the whole tower over four padded tiles), and an interactive request that came while the model thread ran
it waited for all of it. That thread pauses before every layer of the tower while an interactive request waits
or is prefilled, so the interactive prefill has the processor, and goes on afterwards with no work lost; a line
is admitted once its images are encoded. Only while interactive traffic is about (a request waiting or running,
or one within ``INTERACTIVE_GRACE_SECONDS``): with batch lines alone, the two threads' PyTorch work on the same
cores cost the batch more than it gained (bench/batch.py: 1.27x the API's time against 1.04x), so the lines'
images go through the tower in their prefills as before. (Not on a GPU: two tower calls at once would need
twice the memory set aside for one.)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import torch

from llamascope import errors
from llamascope.engines.base import FinishReason
from llamascope.engines.batch import Batch, drop_padding_tiles, positions, set_layer
from llamascope.engines.devices import out_of_memory
from llamascope.engines.kv_cache import new_cache
from llamascope.engines.prefix_cache import PrefixCache
from llamascope.engines.recovery import Checkpoint, out_of_memory_error, recover, shed
from llamascope.engines.requests import BatchLimits, Message, Sequence
from llamascope.engines.sampling import Sampler, chosen_logprobs, log_probabilities, pick
from llamascope.engines.vision import CrossKV, ImageEncoder, JoinKey, VisionCache, batch_tiles, sources
from llamascope.structured.masking import FilledMasks, StepMasks

log = logging.getLogger(__name__)
# Interactive traffic counts as about this long after a request was submitted or last decoded (``Scheduler``).
INTERACTIVE_GRACE_SECONDS = 2.0


class Scheduler:
    """Runs the model on its own thread over a queue of ``Sequence``; see the module's text."""

    def __init__(
        self,
        model: Any,
        pixels: Callable[[Any], dict[str, Any]],  # an image to its pixel tensors, for a vision-cache miss
        eos_ids: set[int],
        limits: BatchLimits,
        vision_cache: VisionCache,
        flush: Callable[[], None],  # hands what was sent on to the readers, once per burst
        faults: bool = False,  # tests only: honour the requests' ``fault`` (``_inject``)
        prefix_cache: PrefixCache | None = None,  # past requests' keys and values; None: no reuse
    ) -> None:
        self.model = model
        self.prefix = prefix_cache if prefix_cache is not None else PrefixCache(0)
        self.faults = faults
        self.flush = flush
        self.pixels = pixels
        self.eos_ids = eos_ids
        self.limits = limits
        self.vision = vision_cache
        text_config = model.config.get_text_config()  # Mllama's text part; a text-only Llama's whole config
        self.text_config = text_config
        self.cross_layers = set(getattr(text_config, "cross_attention_layers", ()))
        # Self-attention caches appended to in place (kv_cache.GrowingLayer); off: transformers' DynamicLayer.
        self.growing_kv = True
        tiles = batch_tiles(limits.vision_batch_tiles, model.device.type)
        # On the CPU batch lines' images are encoded on a thread of their own, which pauses for interactive work.
        lines_apart = model.device.type == "cpu" and bool(self.cross_layers)
        self.encoder = ImageEncoder(model, pixels, vision_cache, self.cross_layers, tiles, pausable=lines_apart)
        for index in self.cross_layers:
            # A token attends to every image state it is given: a prefill chunk that needs no mask runs with none
            # (``_attends``), and transformers' attention functions take a module's ``is_causal`` (default True)
            # when there is no mask.
            model.model.language_model.layers[index].cross_attn.is_causal = False
        self._eos_index = torch.tensor(sorted(eos_ids))
        self.batches = {False: Batch(self.cross_layers), True: Batch(self.cross_layers)}  # by has_image
        self.waiting: deque[Sequence] = deque()
        self.waiting_bytes = 0  # what the waiting requests hold (``Sequence.waiting_bytes``)
        self.background: deque[Sequence] = deque()  # batch lines, admitted only when ``waiting`` is empty
        self.prefilling: Sequence | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._service_time = 5.0  # seconds a request takes, smoothed; for Retry-After
        self.steps = 0
        # Structured output's token masks (set by the engine with its first constrained request), and the thread
        # that fills a step's masks while the model runs (llguidance holds no GIL while it fills).
        self.masks: StepMasks | None = None
        self._filler: ThreadPoolExecutor | None = None
        # A debug mode the model thread runs under (devices.discipline: every tensor names its device).
        self.device_check: Any = None
        self._thread = threading.Thread(target=self._run, name="llamascope-generate", daemon=True)
        self._thread.start()
        self._line_images: threading.Thread | None = None
        self._interactive_at = -math.inf  # when an interactive request was last submitted or in a step
        if lines_apart:
            self._line_images = threading.Thread(target=self._encode_lines, name="llamascope-line-images", daemon=True)
            self._line_images.start()

    # -- from the event loop ---------------------------------------------

    @property
    def active(self) -> int:
        """Requests the model thread is working on (prefilling or in a batch)."""
        return sum(len(b.rows) for b in self.batches.values()) + (self.prefilling is not None)

    def submit(self, seq: Sequence) -> None:
        with self._cond:
            if self._stopping:
                raise errors.ServiceError(503, "ServiceUnavailable", "The server is shutting down.")
            if seq.background:
                self.background.append(seq)
                self._cond.notify_all()
                return
            self._interactive_at = time.monotonic()
            limits = self.limits
            full = limits.max_queued is not None and len(self.waiting) >= limits.max_queued
            if full or (self.waiting and self.waiting_bytes + seq.waiting_bytes > limits.max_queued_bytes):
                retry = math.ceil(self._service_time * (len(self.waiting) + 1) / self.limits.max_batch)
                raise errors.throttled(min(max(retry, 1), 60))
            self.waiting.append(seq)
            self.waiting_bytes += seq.waiting_bytes
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # -- the model thread -------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self.waiting and not self._line_ready() and self.active == 0:
                        self._cond.wait()
                    if self._stopping:
                        break
                try:
                    with self.device_check or contextlib.nullcontext():
                        self._admit()
                        self._hand_over()  # requests it ended without a prefill (cancelled, waited out)
                        for batch in self.batches.values():
                            if batch.rows:
                                self._step(batch)
                                self._hand_over()
                except Exception:  # a bug here must not leave requests waiting for ever
                    log.exception("the scheduler failed; failing the requests it was running")
                    failed: list[Sequence] = [self.prefilling] if self.prefilling else []
                    self.prefilling = None
                    for batch in self.batches.values():
                        failed += batch.rows
                        batch.keep([])
                    for seq in failed:
                        seq.send(errors.internal_error())
                    self.flush()
        prefilling = [self.prefilling] if self.prefilling else []
        for seq in [*self.waiting, *self.background, *prefilling, *(s for b in self.batches.values() for s in b.rows)]:
            seq.send(FinishReason.CANCELLED)
        self.flush()

    def _hand_over(self) -> None:
        """Send the burst just made on its way, and let the event loop's thread take the GIL now to hand it
        out (time.sleep(0)). Otherwise the loop waits until this thread next blocks or is made to switch: a
        first token reached its stream only after the next decode step (2 to 3 ms later on the built-in
        model) in half of the requests, measured."""
        self.flush()
        time.sleep(0)

    def _admit(self) -> None:
        """Prefill waiting requests, at most ``prefill_chunk`` prompt tokens before the next decode step.

        A long prompt is prefilled a chunk at a time, so running streams go on between its chunks
        instead of stalling for the whole prompt; short prompts arriving together are all prefilled
        before the next step. Requests cancelled or waited out are dropped here.
        """
        self._encode_ahead()
        budget = self.limits.prefill_chunk
        while budget > 0:
            seq = self.prefilling or self._next_waiting()
            if seq is None:
                return
            self.prefilling = seq
            ended: Message | None
            try:
                before = seq.prefilled
                ended = self._prefill(seq, budget)
                budget -= seq.prefilled - max(before, seq.reused)  # reused tokens cost no prefill
                if ended is None and seq.cache is not None and seq.inputs is None:  # prefilled: joins the batch
                    self.batches[seq.has_image].add(seq)
            except Exception as exc:
                if out_of_memory(exc):
                    log.warning("out of memory in a prefill; its request ends, the caches are emptied")
                    self._release_memory()
                    ended = out_of_memory_error()
                else:
                    log.exception("prefill failed")
                    ended = errors.internal_error()
            if ended is None and seq.inputs is not None:  # more of its prompt to go, after a decode step
                return
            self.prefilling = None
            if not seq.background and self._line_images is not None:
                with self._cond:  # the batch lines' images may go on
                    self._cond.notify_all()
            if ended is not None:  # sent once it no longer counts as active
                seq.send(ended)
            self._hand_over()  # its first token now, not after the other prompts of this turn

    def _encode_ahead(self) -> None:
        """The images of the requests this turn is expected to admit, through the vision tower together.

        Expected as ``_next_waiting`` and ``_admit`` decide: in queue order (background ones last), while the
        batch bounds leave room and the prefill budget lasts (counting whole prompts: reused prefixes may let
        more in, whose images are then encoded in their prefill as before); cancelled and waited-out requests
        left out.
        """
        limits = self.limits
        with self._cond:
            if len(self.waiting) + len(self.background) < 2:
                return
            now = time.monotonic()
            running = [s for b in self.batches.values() for s in b.rows]
            count, longest = len(running), max((s.budget for s in running), default=0)
            budget = limits.prefill_chunk if self.prefilling is None else 0
            expected = []
            for seq in [*self.waiting, *self.background]:
                if budget <= 0:
                    break
                if seq.cancel.is_set() or (not seq.background and now - seq.queued_at > limits.max_queue_wait):
                    continue
                longest = max(longest, seq.budget)
                if not self._room(count, longest):
                    break
                expected.append(seq)
                count += 1
                budget -= int(seq.inputs["input_ids"].shape[1])
        images = [s for s in expected if s.has_image]
        if len(images) > 1:
            self.encoder.encode_ahead(images)

    def _next_waiting(self) -> Sequence | None:
        """The first waiting request if there is room for it; those cancelled or waited out are ended. A
        background request only when no interactive one waits (and so none is refused for it)."""
        now = time.monotonic()
        with self._cond:
            for ended in [seq for seq in self.background if seq.cancel.is_set()]:
                self.background.remove(ended)
                ended.send(FinishReason.CANCELLED)
            while self.waiting:
                seq = self.waiting[0]
                if seq.cancel.is_set():
                    self._pop_waiting()
                    seq.send(FinishReason.CANCELLED)
                    continue
                if now - seq.queued_at > self.limits.max_queue_wait:
                    self._pop_waiting()
                    seq.send(errors.request_timed_out())
                    continue
                return self._pop_waiting() if self._fits(seq) else None
            if self._line_ready() and self._fits(self.background[0], keep=1):
                self._cond.notify_all()  # the line-images thread may encode one more ahead
                return self.background.popleft()
        return None

    def _line_ready(self) -> bool:
        """Whether the first batch line may be admitted now (its images encoded), or ended (cancelled)."""
        line = self.background[0] if self.background else None
        if line is None:
            return False
        ahead = self._line_images is not None and line.has_image and self._interactive_about()
        return line.images_ready or not ahead or line.cancel.is_set()

    def _interactive_about(self) -> bool:
        """Whether interactive traffic is about: the batch lines' images then go ahead on their own thread."""
        return time.monotonic() - self._interactive_at < INTERACTIVE_GRACE_SECONDS

    # -- the batch lines' images (the CPU) ---------------------------------

    def _encode_lines(self) -> None:
        """Encode the waiting batch lines' images, in queue order, a line ahead of those ready; see the module's
        text. A failure is logged and left to the line's prefill, where the error stays with that line."""
        with torch.inference_mode():
            while True:
                with self._cond:
                    seq = self._next_line_to_encode()
                    while not self._stopping and seq is None:
                        self._cond.wait()
                        seq = self._next_line_to_encode()
                    if self._stopping or seq is None:
                        return
                try:
                    seq.began = True  # before the cancel is looked at (``Sequence.began``)
                    if not seq.cancel.is_set():
                        self.encoder.cross_kv(seq, pause=self._after_interactive)
                except Exception:
                    log.exception("encoding a batch line's images failed; its prefill tries again")
                with self._cond:
                    seq.images_ready = True
                    self._cond.notify_all()

    def _next_line_to_encode(self) -> Sequence | None:
        """The first waiting batch line whose images are not encoded yet, unless two lines are ready already
        (their images held in the vision cache until they run)."""
        if not self._interactive_about():
            return None  # the line's prefill encodes them (the module's text says why)
        ready = 0
        for seq in itertools.islice(self.background, 64):
            if not seq.has_image:
                continue
            if not seq.images_ready:
                return seq
            ready += 1
            if ready >= 2:
                return None
        return None

    def _after_interactive(self) -> None:
        """Wait while an interactive request waits or is being prefilled (the line-images thread, between
        two layers of the vision tower)."""
        with self._cond:
            while not self._stopping and (
                self.waiting or (self.prefilling is not None and not self.prefilling.background)
            ):
                self._cond.wait(0.5)  # (a request ended in the queue tells no one)

    def _fits(self, seq: Sequence, keep: int = 0) -> bool:
        """Whether ``seq`` fits beside the running batch, leaving ``keep`` places free (a background request
        leaves one to the next interactive request, unless the batch is empty: its first token then waits for
        no line to end)."""
        running = [s for b in self.batches.values() for s in b.rows]
        if running and len(running) + 1 + keep > self.limits.max_batch:
            return False
        return self._room(len(running), max([seq.budget, *(s.budget for s in running)]))

    def _room(self, running: int, longest: int) -> bool:
        """Whether one more request fits beside ``running`` ones, the longest budget among them all ``longest``.

        A batch's caches are padded to its longest row: every row counts as long as the longest."""
        limits = self.limits
        return not running or (running < limits.max_batch and (running + 1) * longest <= limits.max_batch_tokens)

    def _pop_waiting(self) -> Sequence:
        seq = self.waiting.popleft()
        self.waiting_bytes -= seq.waiting_bytes
        return seq

    def _prefill(self, seq: Sequence, budget: int) -> FinishReason | errors.ServiceError | None:
        """Run up to ``budget`` more of the prompt, alone. At its end, send the first token.

        None if the request goes on (to more prefill, or to the batch once ``seq.inputs`` is cleared),
        else how it ended.
        """
        seq.began = True  # before the cancel is looked at (``Sequence.began``)
        if seq.cancel.is_set():
            return FinishReason.CANCELLED
        self._inject([seq], "prefill")
        self._inject([seq], "oom")
        inputs = seq.inputs
        device = self.model.device
        ids = inputs["input_ids"]
        first = seq.cache is None
        if first:
            seq.started_at = time.monotonic()
            seq.cache = new_cache(self.text_config, self.cross_layers, self.growing_kv)
            seq.prefilled = seq.reused = self._reuse(seq, ids[0].tolist())
        start = seq.prefilled
        end = min(ids.shape[1], start + budget)
        kwargs: dict[str, Any] = {
            "input_ids": ids[:, start:end].to(device),
            "attention_mask": inputs["attention_mask"][:, :end].to(device),
            "position_ids": positions(start, end, device),
            "use_cache": True,
        }
        if first and seq.has_image:  # its images' keys and values: one image's, views of the vision cache's copy
            images = [entry for entry, _ in self.encoder.cross_kv(seq)]
            seq.image_sources = sources(images)
            rest = inputs["cross_attention_mask"][0, start:]  # [prompt tokens left, images, max tiles]
            all_tiles = int(rest.shape[-1])
            tiles = None
            if bool((rest == rest[0]).all()) and bool(rest[0].any()):
                # Every token left attends to the same tiles, as its answer's tokens will (the next turn of a
                # conversation, its history reused): only those tiles, and no mask to build (``_attends``).
                tiles = self._attends(seq, rest[0])
            key = _join_key(seq, tiles, all_tiles)
            kv = self.vision.joined(key, images) if key is not None else None  # kept by an earlier turn
            if kv is None:  # joined now, and kept when the prefill ends (``_keep_joined``)
                kv = cross_states(images, tiles, all_tiles)
            for index, (keys, values) in zip(self.encoder.cross_layers, kv, strict=True):
                set_layer(seq.cache.layers[index], keys, values)
        kwargs["past_key_values"] = seq.cache
        if seq.has_image and seq.cross_mask is None:
            kwargs["cross_attention_mask"] = inputs["cross_attention_mask"][:, start:end].to(device)
        if end < ids.shape[1]:  # not the last chunk: no output layer
            self.model.model(**kwargs)
            seq.prefilled = end
            return None
        seq.sampler = Sampler(seq.sampling)
        short = self._short([seq])  # before the fill, which has the matcher until its mask is made
        filling = self._fill_ahead([seq])  # its first mask, made while the model runs
        try:
            out = self.model(**kwargs, logits_to_keep=1)
        except BaseException:
            if filling is not None:
                wait([filling])
            raise
        seq.prefilled = end
        seq.mask = inputs["attention_mask"].to(device)
        if seq.has_image and seq.cross_mask is None:  # new tokens attend to what the last prompt token does
            last = inputs["cross_attention_mask"][0, -1]  # [images, max tiles]
            tiles = self._attends(seq, last)
            drop_padding_tiles(seq.cache, self.cross_layers, tiles, int(last.shape[-1]))
            self._keep_joined(seq, tiles, int(last.shape[-1]))
        seq.ids = ids[0].tolist()
        self._remember(seq.ids, seq, seq.cache, 0)  # for requests that start the same way, running beside it
        seq.inputs = None  # pixels and the rest are no longer needed
        seq.pixels = {}
        logits = self._hold_back_eos(out.logits[:, -1, :].float(), short)
        return self._advance(seq, self._pick([seq], logits, filling)[0])

    def _keep_joined(self, seq: Sequence, tiles: list[int], all_tiles: int) -> None:
        """Keep the joined states its answer attends to (several images'), for the next turn of its conversation:
        its prompt's tokens attend to those tiles alone, and its prefill takes them (``VisionCache.joined``)."""
        key = _join_key(seq, tiles, all_tiles)
        if key is not None:
            kv = tuple((seq.cache.layers[i].keys, seq.cache.layers[i].values) for i in self.encoder.cross_layers)
            self.vision.keep_joined(key, seq.image_sources, kv)

    def _attends(self, seq: Sequence, row: Any) -> list[int]:
        """What ``seq``'s new tokens attend to, from a prompt token's row of the cross-attention mask
        [images, max tiles] that they share: each image's real tiles it marks (its first ones), kept as
        ``seq.visible`` and ``seq.cross_mask``.

        Once ``seq.cross_mask`` is set its cross-attention caches hold those tiles alone, and the tokens that
        attend to them run without a mask (a padding tile masked out has no weight, so attending to the rest
        alone is the same): transformers' mask for a prefill chunk is [chunk, every image's tiles x 1,601]
        floats, made in six passes, more than its attention takes with several images on a CPU.
        """
        tiles = [int(t) for t in row.sum(1)]
        seq.visible = tuple(image.digest for image, kept in zip(seq.images, tiles, strict=True) if kept)
        seq.cross_mask = torch.ones((1, 1, 1, sum(tiles)), dtype=row.dtype, device=self.model.device)
        return tiles

    def _reuse(self, seq: Sequence, ids: list[int]) -> int:
        """Put the longest cached prefix of the prompt in its new cache; the prompt tokens it covers."""
        lease = self.prefix.take(ids, seq.images_key)
        if not lease.tokens:
            return 0
        layers = iter(lease.layers)
        for index, layer in enumerate(seq.cache.layers):
            if index not in self.cross_layers:
                set_layer(layer, *next(layers))
        send, prefix = seq.send, self.prefix

        def send_then_give_back(message: Message) -> None:  # its blocks may go once it has ended
            if not isinstance(message, list):
                prefix.give_back(lease)
            send(message)

        seq.send = send_then_give_back
        return lease.tokens

    def _remember(self, ids: list[int], seq: Sequence, cache: Any, row: int) -> None:
        """Put the keys and values of ``ids`` (row ``row`` of ``cache``, its last len(ids) positions) in the
        prefix cache. A failure there (out of memory) costs only the reuse, never the request."""
        if not self.prefix.enabled:
            return
        layers = [
            (layer.keys[row], layer.values[row]) for i, layer in enumerate(cache.layers) if i not in self.cross_layers
        ]
        try:
            self.prefix.store(ids, seq.images_key, layers)
        except Exception:
            log.exception("keeping a prefix failed")

    def _step(self, batch: Batch) -> None:
        """One decode step for every row; rows that finish or were cancelled leave.

        A step that fails is taken back and every row is tried alone (``recovery``): a request that fails
        alone ends with an error, and the others go on as if it had never been in the batch.
        """
        rows = batch.rows
        if self._line_images is not None and not all(s.background for s in rows):
            self._interactive_at = time.monotonic()
        cancelled = [s for s in rows if s.cancel.is_set()]
        if cancelled:
            batch.keep([i for i, s in enumerate(rows) if not s.cancel.is_set()])
            for seq in cancelled:
                seq.send(FinishReason.CANCELLED)
            rows = batch.rows
            if not rows:
                return
        before = Checkpoint(batch)
        try:
            tokens = self._decode(batch)
        except Exception as exc:
            if out_of_memory(exc):
                recovered = shed(batch, before, self._decode, self._release_memory)
            else:
                log.exception("decode step failed for a batch of %d; trying each request alone", len(rows))
                recovered = recover(batch, before, self._decode)
            if recovered is None:
                return
            tokens = recovered
        self.steps += 1
        keep = []
        ended: list[tuple[Sequence, FinishReason | errors.ServiceError]] = []
        for i, (seq, token) in enumerate(zip(batch.rows, tokens, strict=True)):
            finish = self._advance(seq, token)
            if finish is None:
                keep.append(i)
            else:
                ended.append((seq, finish))
        if ended:
            for i, seq in enumerate(batch.rows):
                if i not in keep:  # every token but the last has its keys and values in the cache: for the next turn
                    self._remember(seq.ids[:-1], seq, batch.cache, i)
            batch.keep(keep)
            for seq, finish in ended:  # sent once they no longer count as active
                seq.send(finish)

    def _decode(self, batch: Batch) -> list[int]:
        """The model's step and the next token of every row. Changes only what ``Checkpoint`` takes back."""
        rows = batch.rows
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(rows), 1))], dim=1)
        device = self.model.device
        kwargs: dict[str, Any] = {
            "input_ids": torch.tensor([[s.last] for s in rows], device=device),
            "attention_mask": batch.mask,
            # The last token's own position (padding does not count): the prompt's length plus those made before it.
            "position_ids": torch.tensor([[len(s.ids) - 1] for s in rows], device=device),
            "past_key_values": batch.cache,
            "use_cache": True,
            "logits_to_keep": 1,
        }
        if batch.cross_mask is not None:
            kwargs["cross_attention_mask"] = batch.cross_mask
        self._inject(rows, "decode")
        self._inject(rows, "oom")
        short = self._short(rows)  # before the fill: a matcher is the filler thread's until its mask is made
        filling = self._fill_ahead(rows)  # the constrained rows' masks, made while the model runs
        try:
            logits = self.model(**kwargs).logits[:, -1, :].float()
            self._inject(rows, "sample")
        except BaseException:
            if filling is not None:  # a step tried again must not touch the matchers while this fill runs
                wait([filling])
            raise
        logits = self._hold_back_eos(logits, short)
        return self._pick(rows, logits, filling)

    def _release_memory(self) -> None:
        """Give back what can be given back: the vision cache, and the CUDA allocator's unused blocks."""
        self.vision.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _inject(self, rows: list[Sequence], stage: str) -> None:
        """With ``faults`` on (tests only), fail where a request asked to: its ``fault`` (stage, step)."""
        if self.faults:
            for seq in rows:
                if seq.fault is not None and seq.fault[0] == stage and seq.generated >= seq.fault[1]:
                    if stage == "oom":
                        raise torch.OutOfMemoryError(f"fault injected: out of memory at step {seq.generated}")
                    raise RuntimeError(f"fault injected at {stage}, step {seq.generated}")

    def _fill_ahead(self, rows: list[Sequence]) -> Future[FilledMasks | None] | None:
        """The masks of the rows that decode under a grammar, being filled on the filler thread; None if none does.

        One thread: fills run one after another, so a step run again (recovery) never fills beside its first try.
        A model on the CPU has every core for its step (torch's threads): there a fill beside it slowed the step
        by more than the fill takes (measured: 0.5 ms a step for a 0.3 ms fill, 2 cores; again with the fill made
        row by row, 8 of 16 rows constrained: a median step of 63 ms against 43 ms made here, under a load of 5),
        so it is made here, before the step, and only a model on an accelerator has its fill overlap the step.
        """
        if self.masks is None or all(s.matcher is None for s in rows):
            return None
        if self.model.device.type == "cpu":
            made: Future[FilledMasks | None] = Future()
            made.set_result(self.masks.fill([s.matcher for s in rows]))
            return made
        if self._filler is None:
            self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamascope-masks")
        return self._filler.submit(self.masks.fill, [s.matcher for s in rows])

    def _pick(self, rows: list[Sequence], logits: Any, filling: Future[FilledMasks | None] | None = None) -> list[int]:
        """Each row's next token; the log-probabilities of the rows that asked for them are kept on the row.

        Rows under a grammar (structured output) pick among the tokens it allows: their masks go on after the
        log-probabilities are taken (those stay the model's own) and before the sampling settings, so
        temperature, top-k, top-p and the repetition penalty see only allowed tokens. Other rows are untouched.
        """
        wanted = [i for i, s in enumerate(rows) if s.sampling.logprobs is not None]
        logprobs = log_probabilities(logits, wanted)  # before pick changes the logits
        if filling is None:
            filling = self._fill_ahead(rows)
        if filling is not None and self.masks is not None:
            self.masks.apply(logits, filling.result())
        tokens = pick([s.sampler for s in rows], [s.ids for s in rows], logits, [s.generated for s in rows])
        if logprobs is not None:
            top = [rows[i].sampling.logprobs or 0 for i in wanted]
            for i, found in zip(wanted, chosen_logprobs(logprobs, [tokens[i] for i in wanted], top), strict=True):
                del rows[i].logprobs[rows[i].generated :]  # a step run again (a failed batch's) replaces its own
                rows[i].logprobs.append(found)
        return tokens

    @staticmethod
    def _short(rows: list[Sequence]) -> list[int]:
        """The rows still short of their min_new_tokens, which may not end yet (``_hold_back_eos``).

        Not a row whose grammar cannot end yet: its mask refuses the end-of-turn tokens already, except when it
        allows none of the model's tokens, and then they are all it has left.
        """
        return [
            i
            for i, s in enumerate(rows)
            if s.generated < s.sampler.min_new and (s.matcher is None or s.matcher.can_end)
        ]

    def _hold_back_eos(self, logits: Any, short: list[int]) -> Any:
        """The ``short`` rows' end-of-turn logits become -inf."""
        if short:
            index = torch.tensor(short, device=logits.device)[:, None]
            logits[index, self._eos_index.to(logits.device)] = float("-inf")
        return logits

    def _advance(self, seq: Sequence, token: int) -> FinishReason | errors.ServiceError | None:
        """Record and send a new token; None if the sequence goes on, else how it ends (the caller sends it)."""
        seq.ids.append(token)
        seq.generated += 1
        seq.last = token
        seq.send([token])
        finish: FinishReason | errors.ServiceError
        matcher = seq.matcher
        # A grammar's dead end: it allowed no token (masking gave the row its stop tokens, so that it ends), or
        # failed on the token its own mask allowed (llguidance looks ahead as it takes one, and gives up on a
        # schema that needs an unbounded answer). What was made is no answer of the grammar: never "stop".
        if token in self.eos_ids and matcher is not None and not matcher.can_end:
            finish = grammar_dead_end(seq.generated - 1, matcher.failed, seq.grammar_field)
        elif token in self.eos_ids:
            finish = FinishReason.STOP
        elif matcher is not None and not matcher.advance(token):
            finish = grammar_dead_end(seq.generated, matcher.failed, seq.grammar_field)
        elif matcher is not None and matcher.finished:
            finish = FinishReason.STOP  # its grammar is complete: it ends now, even short of min_new_tokens
        elif seq.generated >= seq.max_new:
            finish = FinishReason.LENGTH
        else:
            return None
        self._service_time = 0.9 * self._service_time + 0.1 * (time.monotonic() - seq.started_at)
        return finish

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
        if self._line_images is not None:
            self._line_images.join(timeout)
        if self._filler is not None and not self._thread.is_alive():
            self._filler.shutdown(wait=False)


def grammar_dead_end(made: int, reason: str, field: str = "") -> errors.ServiceError:
    """The end of an answer whose grammar came to a dead end after ``made`` tokens (``reason``: the library's),
    naming the request ``field`` the grammar came from (``GrammarSpec.field``), as a refusal before it would."""
    why = reason.strip().splitlines()[0] if reason.strip() else "it allows none of the model's tokens"
    log.warning("an answer's grammar came to a dead end after %d tokens: %s", made, why)
    # The caller's schema, not the server, is at fault, and the same request meets it again: a 400, which the
    # SDKs do not retry (a 500 ran it three times on the openai SDK's default retries, each charged).
    return errors.invalid_parameter(
        f"{errors.ALGO_PREFIX}Invalid value for '{field or 'response_format'}': the answer could not be completed in "
        f"the shape asked for: after {made} tokens its schema allows no next token ({why}). A schema that needs an "
        "unbounded answer (a required property holding the schema again) cannot be completed."
    )


def _join_key(seq: Sequence, tiles: list[int] | None, all_tiles: int) -> JoinKey | None:
    """The vision cache's key for the joined states of ``seq``'s images with ``tiles`` of each kept (of
    ``all_tiles``); None where there is nothing joined to keep (one image's states are views of its own entry)."""
    if tiles is None or sum(1 for kept in tiles if kept) < 2:
        return None
    return (*((image.digest, kept) for image, kept in zip(seq.images, tiles, strict=True)), ("", all_tiles))


def cross_states(images: list[CrossKV], tiles: list[int] | None = None, all_tiles: int = 1) -> CrossKV:
    """A request's cross-attention keys and values: its images' one after another, as Mllama's forward lays their
    states out (one image: the vision cache's tensors themselves); with ``tiles``, only image i's first
    ``tiles[i]`` of its ``all_tiles`` tiles (a view for one image, else one copy of the tiles kept)."""
    if tiles is None:
        tiles = [all_tiles] * len(images)

    def kept(kv: CrossKV, layer: int, part: int, count: int) -> Any:
        states = kv[layer][part]
        return states if count == all_tiles else states[:, :, : states.shape[2] // all_tiles * count]

    pieces = [(kv, count) for kv, count in zip(images, tiles, strict=True) if count]
    out = []
    for layer in range(len(images[0])):
        keys, values = ([kept(kv, layer, part, count) for kv, count in pieces] for part in (0, 1))
        out.append((keys[0], values[0]) if len(pieces) == 1 else (torch.cat(keys, dim=2), torch.cat(values, dim=2)))
    return tuple(out)
