"""Each source's memory across windows, in bounded space.

Per source IP: exponentially weighted averages of connections and fan-out per active minute,
a slowly decaying peak fan-out, how many active minutes it has been seen, and its familiar
destinations as a 16384-bit set (a one-hash Bloom filter: a destination never seen before is
*new*; a false "familiar" happens with the share of bits set: 6 % for a sender with a thousand
correspondents, 12 % with two thousand), the time it was first seen, and its usual rate of
never-seen destinations (novelty), which elevated minutes barely move.

The set is held in two tiers with the same bits: up to :data:`SMALL` bit positions inline per
source (16 bytes), and a full 2 KB row only for the sources that go past that (mail
servers, spam runs). A flood of sources that each touch a few servers costs about 90 bytes of
arrays per source. At most ``max_sources`` sources are remembered; when full, the
least recently seen tenth is evicted and counted (``evicted``). Full rows are bounded by
``max_wide``: beyond it the least recently seen source holding one is evicted. Sources of one
window that cannot all be held even after eviction are judged without history (every
destination new, no baseline) and counted (``unremembered``): the detector degrades, it does
not fail. The state serialises to bytes for the store (:meth:`snapshot`).
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass

import numpy as np
import polars as pl

from .features import BITS

WORDS = BITS // 64
#: familiar-destination bits held inline per source before it gets a full row
SMALL = 8
_EMPTY = np.uint16(0xFFFF)
_SCALARS = ("ewma_conns", "ewma_distinct", "peak_distinct", "peak_conns", "minutes", "last_seen_ms", "first_seen_ms",
            "ewma_new", "narrow")
#: set width of the previous release: sources restored from its snapshots keep it (see ``narrow``)
NARROW_BITS = 4096


@dataclass
class HistoryParams:
    alpha: float = 0.05
    """EWMA weight of the newest active minute (about 20 minutes of memory)"""
    peak_decay: float = 0.998
    """per active minute; the peak fan-out halves in about 350 active minutes"""
    max_sources: int = 200_000
    """sources remembered per stream; the least recently seen are evicted beyond this"""
    max_wide: int | None = None
    """sources with a full destination row (BITS bits); None = max_sources // 16 (at least 1024)"""
    learning_minutes: int = 60
    """a source is *learning* until it has been seen for this long (detect.learning_minutes)"""
    novelty_margin: float = 4.0
    """a minute's novelty is *elevated* when new_dst >= base_new + max(novelty_margin, novelty_sd * sqrt(base_new))"""
    novelty_sd: float = 2.0
    novelty_slow: float = 0.1
    """elevated minutes update base_new with this fraction of alpha only: a burst does not become the baseline,
    a lasting change of regime does, slowly"""

    @property
    def wide_limit(self) -> int:
        return self.max_wide if self.max_wide is not None else max(1024, self.max_sources // 16)


class KeyIndex:
    """The slot of each remembered source key (address text, or the prefix an IPv6 source is judged
    by), held as two arrays: the keys as fixed-width bytes, sorted, and their slots. About 24 bytes
    a source (IPv4 keys), against about 130 for a dict of Python strings; lookups of a whole window
    are one binary search, exact (no hashing, so nothing can collide)."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype="S16")
        self.slot = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, key: str) -> int:
        got = int(self.get([key])[0])
        if got < 0:
            raise KeyError(key)
        return got

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.slot.nbytes

    def encode(self, keys: "list[str] | np.ndarray") -> np.ndarray:
        """Keys as bytes of this index's width (widening the index when a longer key comes)."""
        q = keys if isinstance(keys, np.ndarray) and keys.dtype.kind == "S" else np.array(keys, dtype="S")
        if q.dtype.itemsize > self.keys.dtype.itemsize:
            # padding with NULs keeps the order (NUL sorts first and keys hold none)
            self.keys = self.keys.astype(f"S{-(-q.dtype.itemsize // 8) * 8}")
        return q.astype(self.keys.dtype, copy=False)

    def get(self, keys: "list[str] | np.ndarray") -> np.ndarray:
        """Slot of each key, -1 for keys not held."""
        q = self.encode(keys)
        if not len(self.keys) or not len(q):
            return np.full(len(q), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        return np.where(self.keys[pos] == q, self.slot[pos], -1)

    def add(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Hold ``keys`` (distinct, none held yet, this index's width) at ``slots``."""
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        keys, slots = keys[order], np.asarray(slots, dtype=np.int64)[order]
        at = np.searchsorted(self.keys, keys)
        self.keys = np.insert(self.keys, at, keys)
        self.slot = np.insert(self.slot, at, slots)

    def remove(self, slots: np.ndarray) -> None:
        keep = ~np.isin(self.slot, slots)
        self.keys, self.slot = self.keys[keep], self.slot[keep]

    def by_slot(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots, keys) of every key held, in slot order."""
        order = np.argsort(self.slot, kind="stable")
        return self.slot[order], self.keys[order]


class SourceHistory:
    def __init__(self, params: HistoryParams | None = None):
        self.p = params or HistoryParams()
        self.index = KeyIndex()
        self.nslots = 0
        """slots handed out so far (free ones included)"""
        cap = 1024
        self.ewma_conns = np.zeros(cap)
        self.ewma_distinct = np.zeros(cap)
        self.peak_distinct = np.zeros(cap)
        self.peak_conns = np.zeros(cap)
        self.minutes = np.zeros(cap, dtype=np.int64)
        self.last_seen_ms = np.zeros(cap, dtype=np.int64)
        self.first_seen_ms = np.zeros(cap, dtype=np.int64)
        self.ewma_new = np.zeros(cap)
        self.narrow = np.zeros(cap, dtype=np.uint8)
        """1 for a source restored from a snapshot with NARROW_BITS-bit sets: its bits are taken modulo that
        width, so it answers exactly as before the upgrade (no spurious new destinations)"""
        self.small = np.full((cap, SMALL), _EMPTY, dtype=np.uint16)
        """inline familiar bits (positions, unused = 0xFFFF) of sources without a full row"""
        self.nsmall = np.zeros(cap, dtype=np.uint8)
        self.wide_of = np.full(cap, -1, dtype=np.int32)
        """row in ``wide`` of each source that has one, else -1"""
        self.wide = np.zeros((0, WORDS), dtype=np.uint64)
        self.wide_owner = np.zeros(0, dtype=np.int64)
        self.wide_free: list[int] = []
        self.free: list[int] = []
        self.evicted = 0
        """sources forgotten to make room (kept in checkpoints: all evictions of the stream)"""
        self.unremembered = 0
        """sources judged without history because a window held more new sources than fit"""
        self.saturated = 0
        """times a source outgrew its inline bits while no full row could be had (its new bits are lost)"""

    def __len__(self) -> int:
        return len(self.index)

    @property
    def wide_rows(self) -> int:
        return len(self.wide) - len(self.wide_free)

    def nbytes(self) -> int:
        """Approximate memory held: the arrays, the key index and the free-slot list."""
        arrays = sum(getattr(self, n).nbytes for n in _SCALARS) + self.small.nbytes + self.nsmall.nbytes
        arrays += self.wide_of.nbytes + self.wide.nbytes + self.wide_owner.nbytes
        return arrays + self.index.nbytes + sys.getsizeof(self.free) + 8 * len(self.free)

    # -- slots ----------------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        cap = len(self.ewma_conns)
        if need <= cap:
            return
        new = cap
        while new < need:  # the capacity that growing one slot at a time would reach
            new = max(new + 1, min(new * 2, self.p.max_sources))
        for name in _SCALARS + ("nsmall", "wide_of", "small"):
            a = getattr(self, name)
            fill = _EMPTY if name == "small" else (-1 if name == "wide_of" else 0)
            b = np.full((new,) + a.shape[1:], fill, dtype=a.dtype)
            b[:cap] = a
            setattr(self, name, b)

    def _evict(self, n: int, keep: np.ndarray) -> None:
        """Forget the ``n`` least recently seen sources, none of the keys ``keep``."""
        live = np.sort(self.index.slot)
        live = live[~np.isin(live, self.index.get(keep))]
        n = min(n, len(live))
        if n <= 0:
            return
        self._drop(live[np.argpartition(self.last_seen_ms[live], n - 1)[:n]])

    def _drop(self, slots: np.ndarray) -> None:
        self.index.remove(slots)
        self.free.extend(slots.tolist())
        self._clear(slots)
        self.evicted += len(slots)

    def _clear(self, slots: np.ndarray) -> None:
        for name in _SCALARS + ("nsmall",):
            getattr(self, name)[slots] = 0
        self.small[slots] = _EMPTY
        rows = self.wide_of[slots]
        rows = rows[rows >= 0]
        if len(rows):
            self.wide[rows] = 0
            self.wide_owner[rows] = -1
            self.wide_free.extend(rows.tolist())
        self.wide_of[slots] = -1

    def slots(self, ips: "list[str] | np.ndarray") -> np.ndarray:
        """Slot of each address (new ones are added, evicting the least recently seen when full);
        -1 for addresses that found no room (more new sources in one call than the history holds)."""
        q = self.index.encode(ips)
        idx = self.index.get(q)
        missing = np.flatnonzero(idx < 0)
        new = q[:0]
        if len(missing):  # distinct, in order of first appearance
            _, first = np.unique(q[missing], return_index=True)
            new = q[missing[np.sort(first)]]
        if len(new) or len(self.index) > self.p.max_sources:
            room = self.p.max_sources - len(self.index)
            if len(new) > room:
                self._evict(max(len(new) - room, self.p.max_sources // 10), q)
                room = self.p.max_sources - len(self.index)
                if len(new) > room:
                    self.unremembered += len(new) - max(room, 0)
                    new = new[:max(room, 0)]
            # freed slots first (in the order ``free.pop()`` yields them), then fresh ones at the end
            nf = min(len(new), len(self.free))
            reuse = self.free[len(self.free) - nf:][::-1]
            del self.free[len(self.free) - nf:]
            start, fresh = self.nslots, len(new) - nf
            if fresh:
                self._grow(start + fresh)
                self.nslots += fresh
            self.index.add(new, np.array(reuse + list(range(start, start + fresh)), dtype=np.int64))
            if len(missing):
                idx[missing] = self.index.get(q[missing])
        return idx

    # -- familiar destinations ------------------------------------------------------------
    def _width(self, slots: np.ndarray, bits: np.ndarray) -> np.ndarray:
        """Bit positions as each source stores them (narrow sources: modulo NARROW_BITS)."""
        ok = slots >= 0
        if not self.narrow[slots[ok]].any():
            return bits
        narrow = np.zeros(len(slots), dtype=bool)
        narrow[ok] = self.narrow[slots[ok]] != 0
        return np.where(narrow, bits % NARROW_BITS, bits)

    def familiar(self, slots: np.ndarray, bits: np.ndarray) -> np.ndarray:
        """Whether each (slot, bit) is set; slot -1 (a source without history) is never familiar."""
        seen = np.zeros(len(slots), dtype=bool)
        ok = slots >= 0
        bits = self._width(slots, bits)
        rows = np.full(len(slots), -1, dtype=np.int64)
        rows[ok] = self.wide_of[slots[ok]]
        wide = rows >= 0
        if wide.any():
            b = bits[wide].astype(np.uint64)
            seen[wide] = ((self.wide[rows[wide], (b >> np.uint64(6)).astype(np.int64)] >> (b & np.uint64(63)))
                          & np.uint64(1)) != 0
        inline = ok & ~wide
        if inline.any():
            seen[inline] = (self.small[slots[inline]] == bits[inline].astype(np.uint16)[:, None]).any(axis=1)
        return seen

    def _set_wide(self, rows: np.ndarray, bits: np.ndarray) -> None:
        b = bits.astype(np.uint64)
        np.bitwise_or.at(self.wide, (rows, (b >> np.uint64(6)).astype(np.int64)),
                         np.left_shift(np.uint64(1), b & np.uint64(63)))

    def learn(self, slots: np.ndarray, bits: np.ndarray, keep: np.ndarray | None = None) -> None:
        """Set the bits (slots >= 0); sources that outgrow the inline tier get a full row.
        ``keep``: slots that must not be evicted to make a full row (the current window's)."""
        ok = slots >= 0
        if not ok.any():
            return
        bits = self._width(slots, bits)
        pb = np.unique(slots[ok] * BITS + bits[ok].astype(np.int64))
        slot, bit = pb // BITS, pb % BITS
        rows = self.wide_of[slot]
        wide = rows >= 0
        if wide.any():
            self._set_wide(rows[wide].astype(np.int64), bit[wide])
        slot, bit = slot[~wide], bit[~wide]
        if not len(slot):
            return
        present = (self.small[slot] == bit.astype(np.uint16)[:, None]).any(axis=1)
        slot, bit = slot[~present], bit[~present]
        if not len(slot):
            return
        starts = np.flatnonzero(np.r_[True, np.diff(slot) != 0])
        counts = np.diff(np.r_[starts, len(slot)])
        rank = np.arange(len(slot)) - np.repeat(starts, counts)
        owners = slot[starts]
        fits_src = self.nsmall[owners].astype(np.int64) + counts <= SMALL
        fits = np.repeat(fits_src, counts)
        pos = self.nsmall[slot].astype(np.int64) + rank
        self.small[slot[fits], pos[fits]] = bit[fits].astype(np.uint16)
        self.nsmall[owners[fits_src]] += counts[fits_src].astype(np.uint8)
        grow = owners[~fits_src]
        if not len(grow):
            return
        got = self._wide_rows(grow, keep)
        promoted = got >= 0
        # sources that got no row keep their inline bits; the new ones will count as new again
        self.saturated += int((~promoted).sum())
        grow, got = grow[promoted], got[promoted]
        if not len(grow):
            return
        inline = self.small[grow]
        used = inline != _EMPTY
        self._set_wide(np.repeat(got, SMALL)[used.ravel()], inline[used])
        self.small[grow] = _EMPTY
        self.nsmall[grow] = 0
        self.wide_of[grow] = got
        self.wide_owner[got] = grow
        sel = ~fits & np.isin(slot, grow)
        self._set_wide(got[np.searchsorted(grow, slot[sel])], bit[sel])

    def _wide_rows(self, owners: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
        """A free full row for each owner (-1 where none could be had), evicting the least recently
        seen holders of full rows outside ``keep`` once ``max_wide`` rows are in use."""
        k = len(owners)
        limit = self.p.wide_limit
        short = k - len(self.wide_free)
        if short > 0 and len(self.wide) < limit:
            add = min(max(short, min(len(self.wide), limit - len(self.wide))), limit - len(self.wide))
            old = len(self.wide)
            self.wide = np.concatenate([self.wide, np.zeros((add, WORDS), dtype=np.uint64)])
            self.wide_owner = np.concatenate([self.wide_owner, np.full(add, -1, dtype=np.int64)])
            self.wide_free.extend(range(old + add - 1, old - 1, -1))
            short = k - len(self.wide_free)
        if short > 0:
            holders = self.wide_owner[self.wide_owner >= 0]
            if keep is not None:
                holders = holders[~np.isin(holders, keep)]
            n = min(short, len(holders))
            if n > 0:
                self._drop(holders[np.argpartition(self.last_seen_ms[holders], n - 1)[:n]])
        out = np.full(k, -1, dtype=np.int64)
        n = min(k, len(self.wide_free))
        for j in range(n):
            out[j] = self.wide_free.pop()
        return out

    # -- per window -----------------------------------------------------------------------
    def observe(self, feats: pl.DataFrame, pairs: pl.DataFrame) -> pl.DataFrame:
        """Add history columns to one closing batch of window features and learn from it.

        ``feats`` are sorted by window start and ``pairs`` are their (source, destination) pairs
        (:func:`detectors.features.close_windows`); windows are taken in time order, so a
        destination first seen in minute 1 is familiar in minute 2. Columns added (values
        *before* this window): ``new_dst`` (destinations not seen before), ``new_dst_share``,
        ``base_conns``, ``base_distinct``, ``peak_distinct``, ``peak_conns``, ``history_minutes``,
        ``seen_minutes``, ``learning``, ``base_new``, ``new_excess``, ``elevated`` and
        ``rejected_new_dst25``.
        """
        if feats.height == 0:
            return feats.with_columns(
                pl.lit(0, pl.UInt32).alias("new_dst"), pl.lit(0.0).alias("new_dst_share"),
                pl.lit(0.0).alias("base_conns"), pl.lit(0.0).alias("base_distinct"),
                pl.lit(0.0).alias("peak_distinct"), pl.lit(0.0).alias("peak_conns"),
                pl.lit(0, pl.Int64).alias("history_minutes"), pl.lit(0, pl.Int64).alias("seen_minutes"),
                pl.lit(True).alias("learning"), pl.lit(0.0).alias("base_new"), pl.lit(0.0).alias("new_excess"),
                pl.lit(0, pl.UInt8).alias("elevated"), pl.lit(0, pl.UInt32).alias("rejected_new_dst25"))
        # one pass of polars for the whole batch; the minutes are then walked in time order over
        # numpy slices (a destination first seen in minute 1 is familiar in minute 2)
        ws_all = feats["window_start"]
        ws_all = (ws_all.dt.epoch("ms") if ws_all.dtype.is_temporal() else ws_all.cast(pl.Int64)).to_numpy()
        if np.any(ws_all[1:] < ws_all[:-1]):
            raise ValueError("window features must be sorted by window start")
        prow = pairs["row"].to_numpy()
        pbits = pairs["bit"].to_numpy()
        prej = pairs["rej"].to_numpy()
        all_ips = self.index.encode(feats["src_ip"].to_numpy().astype("S"))
        all_conns = feats["connections"].to_numpy().astype(float)
        all_distinct = feats["distinct_dst"].to_numpy().astype(float)
        n = feats.height
        cols = (("base_conns", "ewma_conns"), ("base_distinct", "ewma_distinct"), ("peak_distinct", "peak_distinct"),
                ("peak_conns", "peak_conns"), ("history_minutes", "minutes"), ("base_new", "ewma_new"),
                ("_first_seen", "first_seen_ms"))
        before = {name: np.zeros(n, dtype=getattr(self, arr).dtype) for name, arr in cols}
        new_dst = np.zeros(n, dtype=np.uint32)
        rej_new = np.zeros(n, dtype=np.uint32)
        elevated = np.zeros(n, dtype=np.uint8)
        bounds = np.flatnonzero(np.r_[True, ws_all[1:] != ws_all[:-1], True])
        pbounds = np.searchsorted(prow, bounds)
        P = self.p
        a = P.alpha
        for lo, hi, plo, phi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), pbounds[:-1].tolist(), pbounds[1:].tolist()):
            ws_ms = int(ws_all[lo])
            idx = self.slots(all_ips[lo:hi])
            known = idx >= 0
            at = np.where(known, idx, 0)
            for name, arr in cols:
                before[name][lo:hi] = np.where(known, getattr(self, arr)[at], 0)
            # novelty: which (source, destination) bits were unset before this minute
            pr = prow[plo:phi] - lo
            pidx = idx[pr]
            bits = pbits[plo:phi]
            seen = self.familiar(pidx, bits)
            fresh = np.bincount(pr[~seen], minlength=hi - lo)
            new_dst[lo:hi] = fresh
            rej_new[lo:hi] = np.bincount(pr[~seen & prej[plo:phi]], minlength=hi - lo)
            self.learn(pidx, bits, keep=idx[known])
            # learn the window's values (sources with a slot; a slot lost to a full-row eviction
            # just now is empty again and learns from scratch)
            kidx = idx[known]
            conns = all_conns[lo:hi][known]
            distinct = all_distinct[lo:hi][known]
            novel = fresh[known].astype(float)
            first = self.minutes[kidx] == 0
            base = self.ewma_new[kidx]
            up = novel >= base + np.maximum(P.novelty_margin, P.novelty_sd * np.sqrt(base))
            elevated[lo:hi][known] = up
            elevated[lo:hi][~known] = fresh[~known] >= P.novelty_margin
            w = np.where(up, a * P.novelty_slow, a)
            self.ewma_new[kidx] = np.where(first, novel, (1 - w) * base + w * novel)
            self.ewma_conns[kidx] = np.where(first, conns, (1 - a) * self.ewma_conns[kidx] + a * conns)
            self.ewma_distinct[kidx] = np.where(first, distinct, (1 - a) * self.ewma_distinct[kidx] + a * distinct)
            self.peak_distinct[kidx] = np.maximum(self.peak_distinct[kidx] * self.p.peak_decay, distinct)
            self.peak_conns[kidx] = np.maximum(self.peak_conns[kidx] * self.p.peak_decay, conns)
            self.first_seen_ms[kidx] = np.where(first, ws_ms, self.first_seen_ms[kidx])
            self.minutes[kidx] += 1
            self.last_seen_ms[kidx] = np.maximum(self.last_seen_ms[kidx], ws_ms)
        first_seen = before.pop("_first_seen")
        seen_minutes = np.where(before["history_minutes"] > 0, (ws_all - first_seen) // 60_000, 0).astype(np.int64)
        base_new = before["base_new"]
        return feats.with_columns(
            **{k: pl.Series(v) for k, v in before.items()}, new_dst=pl.Series(new_dst),
            seen_minutes=pl.Series(seen_minutes), learning=pl.Series(seen_minutes < P.learning_minutes),
            new_excess=pl.Series(new_dst.astype(float) - base_new), elevated=pl.Series(elevated),
            rejected_new_dst25=pl.Series(rej_new),
        ).with_columns(new_dst_share=(pl.col("new_dst") / pl.col("distinct_dst")).fill_nan(0.0))

    # -- persistence ----------------------------------------------------------------------
    def snapshot(self) -> bytes:
        live, keys = self.index.by_slot()
        rows = self.wide_of[live]
        has = rows >= 0
        buf = io.BytesIO()
        np.savez_compressed(
            buf, ips=keys.astype(str),
            **{name: getattr(self, name)[live] for name in _SCALARS},
            small=self.small[live], wide_at=np.flatnonzero(has), wide=self.wide[rows[has]],
            evicted=np.array([self.evicted]), bits=np.array([BITS]))
        return buf.getvalue()

    @classmethod
    def restore(cls, data: bytes, params: HistoryParams | None = None) -> "SourceHistory":
        """State from :meth:`snapshot`. When it holds more sources than ``params`` allows, the most
        recently seen are kept. The sources of a snapshot from the previous release (4096-bit sets)
        keep their width (``narrow``), so nothing familiar becomes new; their first-seen time
        defaults to their active minutes before their last."""
        h = cls(params)
        z = np.load(io.BytesIO(data), allow_pickle=False)
        order = np.argsort(-z["last_seen_ms"], kind="stable")[:h.p.max_sources]
        ips = [str(x) for x in z["ips"][order]]
        idx = h.slots(ips)
        for name in _SCALARS:
            if name in z.files:
                getattr(h, name)[idx] = z[name][order]
            elif name == "first_seen_ms":
                h.first_seen_ms[idx] = z["last_seen_ms"][order] - z["minutes"][order] * 60_000
        old_bits = int(z["bits"][0]) if "bits" in z.files else NARROW_BITS
        if old_bits not in (BITS, NARROW_BITS):
            raise ValueError(f"a source-history snapshot with {old_bits}-bit sets cannot be restored")
        if old_bits != BITS:
            h.narrow[idx] = 1
        small = z["small"][order]
        h.small[idx] = small
        h.nsmall[idx] = (small != _EMPTY).sum(axis=1).astype(np.uint8)
        where = np.full(len(z["ips"]), -1, dtype=np.int64)
        where[order] = np.arange(len(order))
        wide_at = where[z["wide_at"]]
        keep = wide_at >= 0
        wide_rows, wide_at = z["wide"][keep], wide_at[keep]
        if len(wide_at):
            got = h._wide_rows(idx[wide_at], idx)
            ok = got >= 0
            h.wide[got[ok], :wide_rows.shape[1]] = wide_rows[ok]
            h.wide_of[idx[wide_at][ok]] = got[ok]
            h.wide_owner[got[ok]] = idx[wide_at][ok]
        h.evicted = int(z["evicted"][0])
        return h
