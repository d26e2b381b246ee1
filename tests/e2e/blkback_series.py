"""The demonstration patch series for `lab bisect`: a git repository holding
Debian's pristine xen-blkback source, then commits on top, all harmless but one.

Two kinds of bad commit. `leak`, the 2014 class of bug: the backend mishandles
the moment its pool of request structures is exhausted. Freeing a request into an empty pool
"recycles" it, and one in 16 such requests is never returned to the pool, so the
pool shrinks below the ring and I/O eventually stops. Only a frontend that keeps
the ring full against a slower backing store (ring-saturation) empties the pool;
a light workload (queue depth 1) never does and passes. `refuse`: the backend
refuses to connect a frontend's ring at all (connect_ring fails), so no test
disk ever connects: every workload fails at attach, which the lab must call
FAIL (the backend's fault), never ERROR (the guests boot from their initramfs,
so they come up without the backend)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

DRIVER = "drivers/block/xen-blkback"

FREE_REQ = """	spin_lock_irqsave(&ring->pending_free_lock, flags);
	was_empty = list_empty(&ring->pending_free);
	list_add(&req->free_list, &ring->pending_free);"""

LEAKY = """	spin_lock_irqsave(&ring->pending_free_lock, flags);
	was_empty = list_empty(&ring->pending_free);
	/*
	 * The pool ran dry: the ring thread is waiting for this request, so
	 * hand it over directly instead of queueing it.
	 */
	if (was_empty && (atomic_inc_return(&lab_recycled) % 16) == 0) {
		spin_unlock_irqrestore(&ring->pending_free_lock, flags);
		wake_up(&ring->pending_free_wq);
		return;
	}
	list_add(&req->free_list, &ring->pending_free);"""


CONNECT_RING = """	unsigned int ring_page_order;

	pr_debug("%s %s\\n", __func__, dev->otherend);"""
REFUSE = CONNECT_RING + """
	/* lab demo: a frontend's ring is never accepted */
	xenbus_dev_fatal(dev, -EINVAL, "lab demo: refusing to map the ring");
	return -EINVAL;"""


def _refuse(xenbus: str) -> str:
    assert CONNECT_RING in xenbus, "connect_ring() is not as expected"
    return xenbus.replace(CONNECT_RING, REFUSE, 1)


# lifecycle bugs, in xen_blkif_disconnect (xenbus.c)
FREE_CACHES = """		/* Remove all persistent grants and the cache of ballooned pages. */
		xen_blkbk_free_caches(ring);
"""
CACHE_CHECKS = """		BUG_ON(ring->persistent_gnt_c != 0);
"""
BUSY = """		if (atomic_read(&ring->inflight) > 0) {
			busy = true;
			continue;
		}"""
BUSY_FORGETS = """		if (atomic_read(&ring->inflight) > 0) {
			busy = true;
			/* lab demo: nothing more to do for this ring */
			ring->active = false;
			continue;
		}"""


def _free_order(xenbus: str) -> str:
    """Teardown frees in the wrong order: the grant and page caches are checked
    empty before they are freed, so every disconnect after I/O is a kernel BUG."""
    assert FREE_CACHES in xenbus and CACHE_CHECKS in xenbus, "xen_blkif_disconnect() is not as expected"
    xenbus = xenbus.replace(FREE_CACHES, "", 1)
    return xenbus.replace(CACHE_CHECKS, CACHE_CHECKS + FREE_CACHES, 1)


def _busy_forgets(xenbus: str) -> str:
    """A disconnect with requests still in flight marks the ring inactive, so the
    retry once they complete skips it: its event channel, mapped ring and grants
    are never released (only a guest destroyed under load shows it)."""
    assert BUSY in xenbus, "xen_blkif_disconnect() is not as expected"
    return xenbus.replace(BUSY, BUSY_FORGETS, 1)


RING_ORDER = """	err = xenbus_scanf(XBT_NIL, dev->otherend, "ring-page-order", "%u",
			   &ring_page_order);
	if (err != 1) {"""
STALE_ORDER = """	err = xenbus_scanf(XBT_NIL, dev->otherend, "ring-page-order", "%u",
			   &ring_page_order);
	/* lab demo: the ring size was negotiated on the first connect already */
	if (blkif->nr_ring_pages) {
		err = 0;
	} else if (err != 1) {"""
RESET_PAGES = """	blkif->nr_ring_pages = 0;
"""


def _stale_ring(xenbus: str) -> str:
    """A reconnect keeps the ring size of the first connection: the reset in
    xen_blkif_disconnect is gone and connect_ring keeps what it finds. A frontend
    that reconnects with another ring size is mapped with the old one (its ring
    refs not found, or a ring of the wrong size); a first connect, a detach and
    attach (a fresh device) or a reconnect with the same ring are unharmed. Seen
    for real on ring-reconnect: "22 reading .../ring-ref" (a one-page read of a
    four-page frontend), then a WARNING in xen_blkif_disconnect: CRASH."""
    assert RING_ORDER in xenbus and RESET_PAGES in xenbus, "connect_ring()/xen_blkif_disconnect() not as expected"
    xenbus = xenbus.replace(RESET_PAGES, "", 1)
    return xenbus.replace(RING_ORDER, STALE_ORDER, 1)


XENBUS_BUGS = {
    "refuse": (_refuse, "xen-blkback: validate the frontend's ring before mapping it"),
    "free-order": (_free_order, "xen-blkback: check the caches are empty before freeing them"),
    "busy-forgets": (_busy_forgets, "xen-blkback: retire a busy ring at once on disconnect"),
    "stale-ring": (_stale_ring, "xen-blkback: negotiate the ring size once per device"),
}


def _harmless_comment(text: str, n: int) -> str:
    anchor = "static void free_req(struct xen_blkif_ring *ring, struct pending_req *req)"
    return text.replace(anchor, f"/* lab demo: harmless change {n}: pending requests return to the pool here. */\n"
                        + anchor, 1)


def _bug(text: str) -> str:
    assert FREE_REQ in text, "free_req() is not as expected"
    text = text.replace(FREE_REQ, LEAKY, 1)
    return text.replace("static void free_req(struct xen_blkif_ring *ring, struct pending_req *req)",
                        "static atomic_t lab_recycled = ATOMIC_INIT(0);\n\n"
                        "static void free_req(struct xen_blkif_ring *ring, struct pending_req *req)", 1)


def make_series(dest: Path, pristine: Path, *, bad_at: int, total: int, bug: str = "leak") -> list[str]:
    """A repo at `dest`: the pristine tree (commit 0), then `total` commits of which
    number `bad_at` (1-based) adds the bug (`leak`, or one of XENBUS_BUGS).
    Returns the commit shas, base first."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / DRIVER).mkdir(parents=True)
    for f in ("blkback.c", "xenbus.c", "common.h", "Makefile"):
        src = pristine / DRIVER / f
        if src.exists():
            shutil.copyfile(src, dest / DRIVER / f)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(dest), *args], check=True, capture_output=True, text=True,
                              env={"GIT_AUTHOR_NAME": "lab", "GIT_AUTHOR_EMAIL": "lab@localhost",
                                   "GIT_COMMITTER_NAME": "lab", "GIT_COMMITTER_EMAIL": "lab@localhost",
                                   "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
                                   "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
                                   "PATH": "/usr/bin:/bin"}).stdout.strip()

    git("init", "-q", "-b", "main")
    git("add", "-A")
    git("commit", "-q", "-m", "xen-blkback: pristine Debian source")
    shas = [git("rev-parse", "HEAD")]
    blk = dest / DRIVER / "blkback.c"
    for i in range(1, total + 1):
        text = blk.read_text()
        if i == bad_at and bug in XENBUS_BUGS:
            xb = dest / DRIVER / "xenbus.c"
            change, msg = XENBUS_BUGS[bug]
            xb.write_text(change(xb.read_text()))
        elif i == bad_at:
            blk.write_text(_bug(text))
            msg = "xen-blkback: hand requests freed into an exhausted pool straight to the ring thread"
        else:
            blk.write_text(_harmless_comment(text, i))
            msg = f"xen-blkback: document the request pool ({i})"
        git("commit", "-q", "-am", msg)
        shas.append(git("rev-parse", "HEAD"))
    return shas
