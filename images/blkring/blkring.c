/*
 * blkring: a Xen block frontend in guest userspace (xen-blklab, issue 17).
 *
 * It takes one virtual block device that the guest kernel's blkfront was kept
 * off (the lab writes 0 to /sys/bus/xen/drivers_autoprobe around `xl
 * block-attach`: the backend waits in InitWait, the frontend node stays
 * Initialising), and speaks the blkif protocol to dom0's blkback itself:
 *
 *   /dev/xen/xenbus    xenstore (the xsd_sockmsg wire protocol; paths are
 *                      relative to this domain's home)
 *   /dev/xen/gntalloc  ring and data pages granted to the backend's domain
 *   /dev/xen/evtchn    an unbound event channel for the backend to bind
 *
 * Why a program and not fio: blkfront behind fio is a polite frontend (block
 * layer merging and plugging, fio's own overhead); this one can keep the ring
 * full and re-queue each slot the instant its response lands, notifying on
 * every push (what the Citrix Windows PV driver did when the seed bug was
 * found), and it can send what no well-behaved frontend sends (the hostile
 * cases), each with its expected outcome asserted.
 *
 * A reconnect schedule (--reconnect-orders 2,0,1) splits the run into phases,
 * each on a connection of its own with the next ring page order: the frontend
 * drains, closes (Closing, Closed), writes Initialising and connects again with
 * a ring of another size, which takes blkback through "prepare for reconnect"
 * and connect_ring() again. Each connection's ring size is then measured from
 * where the backend puts its responses (probe_ring()), so a backend that keeps
 * an earlier connection's ring is named, not merely seen to hang.
 *
 * Several queues (--queues N): with the backend's multi-queue-max-queues >= 2
 * the connection has min(N, offer) rings (multi-queue-num-queues, queue-<i>/
 * ring-ref.. and event-channel; ring-page-order stays at the device's level,
 * as blkfront writes it), each with its own port on the one evtchn file and
 * `depth` slots of its own, so every ring is kept full by the same loop; a
 * slot's id says its queue. After each connect every queue must answer a read
 * on its own ring (check_queues()): fewer serving queues is a problem.
 *
 * Output: one JSON object (stdout, or --output FILE written aside and renamed)
 * and, every 200 ms, a one-line counter file for the lab's guest sampler
 * (--stat FILE, see write_stat()). lab/ringfront.py parses both.
 *
 * Exit codes: 0 every expectation held; 1 the run found a problem (an error
 * response nobody asked for, a verify mismatch, a hostile case whose
 * expectation failed, requests never completed, a response for no request, a
 * reconnect the backend refused, a ring of another size than the one granted,
 * fewer queues serving than min(asked, offered), a scheduled connection that
 * completed nothing, a backend stuck in Closing after a close mid-flight); 2
 * usage; 3 could not set up or connect (the JSON's "fatal" says where).
 *
 * Build (the lab does this on L0, lab/images.py):
 *   gcc -std=gnu11 -O2 -static -Wall -Wextra -Werror -o blkring blkring.c
 * Headers: only libc and the kernel UAPI of Debian 12's linux-libc-dev
 * (<xen/gntalloc.h>, <xen/evtchn.h>). The blkif ring is written out below.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <linux/ioctl.h>
/* <xen/evtchn.h> (IOCTL_EVTCHN_RESTRICT_DOMID) uses domid_t without defining
 * it; Xen's own headers make it a uint16_t (xen/include/public/xen.h). */
typedef uint16_t domid_t;
#include <xen/evtchn.h>
#include <xen/gntalloc.h>

#define VERSION 1
#define PAGE 4096u
#define SECTOR 512u
#define SECTORS_PER_PAGE (PAGE / SECTOR)

/* ------------------------------------------------------------------ blkif
 * The shared ring, x86_64 ABI ("x86_64-abi"), written out from Xen's public
 * headers: xen/include/public/io/blkif.h (requests, responses, operations)
 * and xen/include/public/io/ring.h (DEFINE_RING_TYPES: the sring header, the
 * index arithmetic, the notify rules). Natural alignment on x86_64 gives the
 * layout blkback's blkif_x86_64_request expects: a request is 112 bytes, a
 * response 16, the sring header 64 (four RING_IDX then 48 bytes of padding).
 */
typedef uint32_t RING_IDX;
typedef uint32_t grant_ref_t;

#define BLKIF_OP_READ 0
#define BLKIF_OP_WRITE 1
#define BLKIF_OP_FLUSH_DISKCACHE 3
#define BLKIF_OP_DISCARD 5
#define BLKIF_OP_INDIRECT 6

#define BLKIF_RSP_EOPNOTSUPP (-2)
#define BLKIF_RSP_ERROR (-1)
#define BLKIF_RSP_OKAY 0

#define BLKIF_MAX_SEGMENTS_PER_REQUEST 11
#define BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST 8

struct blkif_request_segment {
	grant_ref_t gref; /* the page to transfer to or from */
	uint8_t first_sect, last_sect; /* 512-byte sectors within that page, inclusive */
	uint8_t pad[2];
};
#define SEGS_PER_INDIRECT_FRAME (PAGE / sizeof(struct blkif_request_segment))

struct blkif_request_rw {
	uint8_t operation; /* BLKIF_OP_READ, _WRITE, _FLUSH_DISKCACHE */
	uint8_t nr_segments;
	uint16_t handle;
	uint32_t pad;
	uint64_t id; /* echoed in the response */
	uint64_t sector_number; /* 512-byte units */
	struct blkif_request_segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
};

struct blkif_request_discard {
	uint8_t operation; /* BLKIF_OP_DISCARD */
	uint8_t flag; /* BLKIF_DISCARD_SECURE or 0 */
	uint16_t handle;
	uint32_t pad;
	uint64_t id;
	uint64_t sector_number;
	uint64_t nr_sectors;
};

struct blkif_request_indirect {
	uint8_t operation; /* BLKIF_OP_INDIRECT */
	uint8_t indirect_op; /* BLKIF_OP_READ or _WRITE */
	uint16_t nr_segments;
	uint32_t pad;
	uint64_t id;
	uint64_t sector_number;
	uint16_t handle;
	uint16_t pad2;
	grant_ref_t indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
};

union blkif_request {
	struct blkif_request_rw rw;
	struct blkif_request_discard discard;
	struct blkif_request_indirect indirect;
};

struct blkif_response {
	uint64_t id;
	uint8_t operation;
	uint8_t pad;
	int16_t status; /* BLKIF_RSP_* */
	uint32_t pad2;
};

union blkif_sring_entry {
	union blkif_request req;
	struct blkif_response rsp;
};

struct blkif_sring {
	RING_IDX req_prod, req_event;
	RING_IDX rsp_prod, rsp_event;
	uint8_t pad[48];
	union blkif_sring_entry ring[];
};

_Static_assert(sizeof(struct blkif_request_segment) == 8, "segment: 8 bytes");
_Static_assert(sizeof(struct blkif_request_rw) == 112, "blkif_request: 112 bytes on x86_64");
_Static_assert(offsetof(struct blkif_request_rw, id) == 8, "id at 8");
_Static_assert(offsetof(struct blkif_request_rw, sector_number) == 16, "sector_number at 16");
_Static_assert(offsetof(struct blkif_request_rw, seg) == 24, "seg at 24");
_Static_assert(offsetof(struct blkif_request_discard, nr_sectors) == 24, "discard nr_sectors at 24");
_Static_assert(offsetof(struct blkif_request_indirect, nr_segments) == 2, "indirect nr_segments at 2");
_Static_assert(offsetof(struct blkif_request_indirect, handle) == 24, "indirect handle at 24");
_Static_assert(offsetof(struct blkif_request_indirect, indirect_grefs) == 28, "indirect grefs at 28");
_Static_assert(sizeof(union blkif_request) == 112, "a request slot: 112 bytes");
_Static_assert(sizeof(struct blkif_response) == 16, "blkif_response: 16 bytes");
_Static_assert(offsetof(struct blkif_response, status) == 10, "status at 10");
_Static_assert(sizeof(union blkif_sring_entry) == 112, "ring entry: 112 bytes");
_Static_assert(offsetof(struct blkif_sring, ring) == 64, "sring header: 64 bytes");

/* __CONST_RING_SIZE(blkif, pages * 4096): the entries that fit after the
 * header, rounded down to a power of two: 32 for one page, 32 << order. */
static unsigned ring_entries(unsigned pages)
{
	unsigned n = (pages * PAGE - (unsigned)offsetof(struct blkif_sring, ring)) / sizeof(union blkif_sring_entry);
	unsigned p = 1;
	while (p * 2 <= n)
		p *= 2;
	return p;
}

/* xenbus states (xen/include/public/io/xenbus.h) */
enum { XB_UNKNOWN = 0, XB_INITIALISING = 1, XB_INITWAIT = 2, XB_INITIALISED = 3, XB_CONNECTED = 4,
       XB_CLOSING = 5, XB_CLOSED = 6 };

/* xenstore wire protocol (xen/include/public/io/xs_wire.h) */
struct xsd_sockmsg {
	uint32_t type, req_id, tx_id, len;
};
enum { XS_READ = 2, XS_WRITE = 11, XS_RM = 13, XS_WATCH_EVENT = 15, XS_ERROR = 16 };
#define XENSTORE_PAYLOAD_MAX 4096

/* ------------------------------------------------------------------ options */
enum { B_AGGRESSIVE, B_BURSTY };
enum { OP_READ, OP_WRITE, OP_FLUSH, OP_DISCARD, OP_MIXED };
static const char *const BEHAVIOURS[] = { "aggressive", "bursty" };
static const char *const OPS[] = { "read", "write", "flush", "discard", "mixed" };
enum { END_CLOSE, END_LINGER };
static const char *const AT_END[] = { "close", "linger" };

enum { H_SEGMENTS, H_GREF, H_RANGE, H_PROD, H_KILL, H_REUSE, H_MIDFLIGHT, H_REVOKED, H_COUNT };
static const char *const CASES[H_COUNT] = { "too-many-segments", "bad-grant-ref", "out-of-range-sector",
					    "prod-ahead", "kill-with-outstanding", "slot-reuse",
					    "reconnect-mid-flight", "revoked-grant-ref" };

#define MAX_RECONNECTS 8
#define MAX_QUEUES 16 /* blkring's limit; blkback offers multi-queue-max-queues (dom0's vCPUs by default) */
struct opts {
	unsigned devid;
	bool have_devid;
	double duration;
	int behaviour, op, at_end;
	unsigned rwmixread; /* percent of reads in op=mixed */
	unsigned segments; /* pages per request; > 11 = indirect */
	unsigned depth; /* requests kept in flight; 0 = every slot */
	unsigned ring_order;
	unsigned queues; /* rings asked for (multi-queue-num-queues), capped at the backend's offer */
	bool persistent, notify_always, busy_poll, verify;
	int hostile[H_COUNT];
	unsigned nhostile;
	double burst_gap, halt_wait, connect_timeout, drain_timeout, linger_max;
	double close_timeout; /* how long the backend may take to follow Closing and Closed */
	double settle; /* idle seconds around each reconnect (see reconnect()) */
	unsigned reconnect_orders[MAX_RECONNECTS], nreconnect; /* the schedule's later phases */
	uint64_t size_bytes; /* the part of the disk used; 0 = all */
	uint64_t seed;
	char stat[256], output[256];
};

static struct opts O = {
	.duration = 30, .behaviour = B_AGGRESSIVE, .op = OP_READ, .at_end = END_CLOSE, .rwmixread = 50,
	.segments = 1, .queues = 1, .notify_always = true, .halt_wait = 2, .connect_timeout = 30, .drain_timeout = 60,
	.linger_max = 3600, .close_timeout = 10,
};

/* ------------------------------------------------------------------ state */
/* what a request is: a normal one; a malformed one (its error is expected
 * and blkback counts it by operation but never its sectors); an orphan, left
 * outstanding by a killed frontend (blkback counts its sectors if it was
 * served, and an error is the expected "invalid buffer") */
enum { K_NORMAL, K_MALFORMED, K_ORPHAN };

struct slot {
	bool busy; /* a request of this slot is on the ring */
	uint8_t kind; /* K_* */
	bool answered; /* its response arrived since it was last submitted */
	uint8_t op; /* OP_READ .. OP_DISCARD */
	uint8_t vphase; /* verify: 0 = pattern write in flight, 1 = read-back in flight */
	uint8_t extra; /* more requests with this slot's id on the ring (slot-reuse): answered first */
	int16_t status; /* the last response's */
	uint32_t nsect;
	uint64_t sector, gen, t0;
};

/* One ring of a connection: with multi-queue-num-queues = N, blkback serves N of
 * them, each with its own pages and event channel (queue-<i>/ring-ref..,
 * queue-<i>/event-channel); one queue keeps the nodes at the device's level. */
struct queue {
	struct blkif_sring *sring;
	grant_ref_t ring_grefs[16];
	uint32_t port;
	RING_IDX req_prod_pvt, rsp_cons;
	unsigned inflight; /* = req_prod_pvt - rsp_cons while the ring is sane */
};

struct conn {
	int gfd, efd; /* one event channel file: every queue's port is bound on it */
	unsigned backend_id, number;
	char be[256]; /* the backend's xenstore directory */
	struct queue q[MAX_QUEUES];
	unsigned nq; /* queues of this connection: min(--queues, the backend's offer) */
	unsigned pages, size; /* ring pages, ring entries (each queue's) */
	uint8_t *data; /* nq x depth x segments pages */
	grant_ref_t *data_grefs;
	size_t ndata;
	uint8_t *ind; /* depth x ipp indirect pages */
	grant_ref_t *ind_grefs;
	size_t nind;
	unsigned ipp; /* indirect pages per request (0: direct segments) */
	unsigned inflight; /* over all queues */
	/* what the backend offered */
	unsigned max_order, max_indirect, max_queues;
	bool be_persistent, flush, discard;
	uint64_t sectors;
	unsigned sector_size;
	bool live; /* mapped and bound: conn_free() has something to do */
};

/* What blkback's statistics (rd_req, wr_req, f_req, ds_req, rd_sect, wr_sect)
 * count, as it counts it: a request by its operation when the backend takes
 * it, its sectors only once its bios went out. blkback's restart at 0 with each
 * connection; the lab's dom0 sampler continues them across reconnects
 * (lab/sampling.py rebase), so these are summed over the connections. */
struct conncount {
	uint64_t reads, writes, flushes, discards, sectors_read, sectors_written, completed;
};

/* One connection (or an attempt at one), for the JSON's connections_detail:
 * what was asked, what the backend allowed and what it serves (probe_ring()),
 * what went through it. `problem` is empty while it is sound. */
struct conninfo {
	unsigned requested_order, max_order, allowed_pages, pages, entries, depth;
	unsigned queues, queues_serving; /* negotiated; seen to answer on their own ring (check_queues()) */
	bool connected, scheduled; /* scheduled: a phase of the run, which must complete requests */
	uint64_t requests, okay, error, other;
	char problem[400];
};
#define MAX_CONNS 24 /* the first, 2 hostile reconnects and 1 after them, 8 scheduled; room to spare */

#define HIST_BUCKETS (64 + 58 * 32)
struct stats {
	uint64_t requests, okay, error, eopnotsupp, other_status;
	uint64_t completed_by_op[4];
	uint64_t bytes_read, bytes_written;
	uint64_t notifies, events, unexpected_errors, bogus_responses, never_completed;
	uint64_t total_completed, conn_completed;
	struct conncount acc;
	uint64_t hist[HIST_BUCKETS], lat_n, lat_sum_us, lat_max_us;
	uint64_t verify_checked, verify_mismatches, first_mismatch_sector;
	uint64_t *series_done;
	uint32_t *series_inflight;
	size_t series_cap, series_len;
};

struct case_result {
	const char *name;
	char expected[200], got[400];
	bool ok;
};

static struct conn C = { .gfd = -1, .efd = -1 };
static struct stats ST;
static struct slot *S;
static unsigned *freelist;
static unsigned nfree, depth, nslots, nsect_req; /* depth: a queue's slots; nslots: every queue's */
static unsigned slot_cap; /* S and freelist hold this many: the largest rings of the run */
static uint64_t q_requests[MAX_QUEUES], q_completed[MAX_QUEUES]; /* per queue, over the run */
static const char *lost_why; /* the device can no longer be used (a hostile case left it so) */
static unsigned cur_order; /* the ring page order the next connect asks for */
static struct conninfo conns[MAX_CONNS];
static unsigned nconns;
static uint64_t idle_ns; /* time spent reconnecting in the schedule (not in runtime_s) */
static uint64_t phase_done0; /* the connection's completions when its phase began */
static uint64_t nblocks, span_sectors;
static uint64_t t_start, t_io0, t_base0, t_io_end, next_stat, rng_state, verify_next, nonce;
static struct case_result results[H_COUNT];
static unsigned nresults;
static char problems[16][700];
static unsigned nproblems;
static const char *closed_how = "none";
static volatile sig_atomic_t stop_requested;
static int xs_fd = -1;
static uint32_t xs_next_id = 1;
static char fedir[64];

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The pass clock. In a 64-bit PV guest every system call bounces through Xen,
 * and clock_gettime is likely not served by the vDSO there (nested, under TCG
 * even more so): a clock read per request would be a good part of what a
 * request costs the frontend, whose CPU dom0's blkback shares. So the I/O
 * loops read the clock once per pass (a reap of the responses waiting and the
 * requests that replace them, see run_base()) and stamp every submit and
 * completion of that pass with it, as well as the pass's tick() and deadline
 * check. A request's latency is then the time from the start of the pass it
 * went out in to the start of the pass its response was reaped in: its
 * granularity is one pass (a batch), and it may read high by up to one pass's
 * work. Its per-second bucket (series) is its pass's second. Outside a pass
 * (connect, the probes, the hostile cases) a stamp reads the clock, and a
 * reap() with responses opens a pass of its own. */
static bool pass_open;
static uint64_t pass_t;

static uint64_t pass_begin(void)
{
	pass_open = true;
	return pass_t = now_ns();
}

static void pass_end(void)
{
	pass_open = false;
}

/* the time of a submit or a completion: the pass's, or the clock's outside one */
static uint64_t stamp(void)
{
	return pass_open ? pass_t : now_ns();
}

static uint64_t rnd(void)
{ /* xorshift64*: the choice of sectors and ops, not security */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545F4914F6CDD1Dull;
}

static void problem(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void problem(const char *fmt, ...)
{
	if (nproblems >= sizeof problems / sizeof problems[0])
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(problems[nproblems++], sizeof problems[0], fmt, ap);
	va_end(ap);
}

/* The connection being made or used: its counts and its problem. */
static struct conninfo *conn_now(void)
{
	return &conns[nconns ? nconns - 1 : 0];
}

/* A new connection attempt asking for ring page order `order`. */
static void conn_begin(unsigned order)
{
	if (nconns < MAX_CONNS)
		nconns++;
	struct conninfo *ci = conn_now();
	memset(ci, 0, sizeof *ci);
	ci->requested_order = order;
	cur_order = order;
}

static uint64_t conn_done(const struct conninfo *ci)
{
	return ci->okay + ci->error + ci->other;
}

/* A problem of the current connection: in its record, and (one line, with the
 * connection's number and ring) among the run's problems. */
static void conn_problem(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void conn_problem(const char *fmt, ...)
{
	struct conninfo *ci = conn_now();
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(ci->problem, sizeof ci->problem, fmt, ap);
	va_end(ap);
	problem("connection %u (ring-page-order %u): %s", nconns, ci->requested_order, ci->problem);
}

static void emit_json(const char *fatal_stage, const char *fatal_msg);
static void write_stat(void);
static void peak_inflight(uint64_t t);

static void fatal(const char *stage, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
static void fatal(const char *stage, const char *fmt, ...)
{
	char msg[600];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	fprintf(stderr, "blkring: %s: %s\n", stage, msg);
	emit_json(stage, msg);
	exit(strcmp(stage, "usage") == 0 ? 2 : 3);
}

/* ------------------------------------------------------------------ xenstore */
static int read_full(int fd, void *buf, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = read(fd, (char *)buf + got, n - got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return r < 0 ? -errno : -EIO;
		got += (size_t)r;
	}
	return 0;
}

static int xs_errno(const char *s)
{
	static const struct { const char *name; int e; } map[] = {
		{ "ENOENT", ENOENT }, { "EACCES", EACCES }, { "EINVAL", EINVAL }, { "EEXIST", EEXIST },
		{ "EAGAIN", EAGAIN }, { "EBUSY", EBUSY },   { "ENOSPC", ENOSPC }, { "E2BIG", E2BIG },
		{ "EPERM", EPERM },   { "EISDIR", EISDIR }, { "EROFS", EROFS },   { "ENOMEM", ENOMEM },
	};
	for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
		if (strcmp(s, map[i].name) == 0)
			return map[i].e;
	return EIO;
}

/* One request, one reply: the message and its payload go out in one write
 * (the kernel's xenbus_dev_frontend accumulates partial writes, but one is
 * simpler); the reply's req_id must be ours. No watches are registered, so a
 * watch event cannot arrive; one would be skipped rather than read as a reply. */
static int xs_request(uint32_t type, const char *a, size_t alen, const char *b, size_t blen, char *reply,
		      size_t cap)
{
	char msg[sizeof(struct xsd_sockmsg) + XENSTORE_PAYLOAD_MAX];
	struct xsd_sockmsg h = { type, xs_next_id++, 0, (uint32_t)(alen + blen) };
	if (alen + blen > XENSTORE_PAYLOAD_MAX)
		return -E2BIG;
	memcpy(msg, &h, sizeof h);
	memcpy(msg + sizeof h, a, alen);
	if (blen)
		memcpy(msg + sizeof h + alen, b, blen);
	size_t total = sizeof h + alen + blen;
	ssize_t w;
	do
		w = write(xs_fd, msg, total);
	while (w < 0 && errno == EINTR);
	if (w != (ssize_t)total)
		return w < 0 ? -errno : -EIO;
	for (;;) {
		struct xsd_sockmsg r;
		char body[XENSTORE_PAYLOAD_MAX + 1];
		int e = read_full(xs_fd, &r, sizeof r);
		if (e)
			return e;
		if (r.len > XENSTORE_PAYLOAD_MAX)
			return -EPROTO;
		if ((e = read_full(xs_fd, body, r.len)))
			return e;
		body[r.len] = 0;
		if (r.type == XS_WATCH_EVENT)
			continue;
		if (r.req_id != h.req_id)
			return -EPROTO;
		if (r.type == XS_ERROR)
			return -xs_errno(body);
		if (reply && cap) {
			size_t n = r.len < cap - 1 ? r.len : cap - 1;
			memcpy(reply, body, n);
			reply[n] = 0;
		}
		return 0;
	}
}

static int xs_read(const char *path, char *buf, size_t cap)
{
	return xs_request(XS_READ, path, strlen(path) + 1, NULL, 0, buf, cap);
}

static int xs_write(const char *path, const char *value)
{
	return xs_request(XS_WRITE, path, strlen(path) + 1, value, strlen(value), NULL, 0);
}

static int xs_rm(const char *path)
{
	return xs_request(XS_RM, path, strlen(path) + 1, NULL, 0, NULL, 0);
}

static void xs_write_or_die(const char *stage, const char *path, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void xs_write_or_die(const char *stage, const char *path, const char *fmt, ...)
{
	char v[128];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(v, sizeof v, fmt, ap);
	va_end(ap);
	int e = xs_write(path, v);
	if (e)
		fatal(stage, "xenstore write %s = %s: %s", path, v, strerror(-e));
}

/* an unsigned number from xenstore; `dflt` when the node is missing */
static uint64_t xs_uint(const char *path, uint64_t dflt)
{
	char v[64];
	if (xs_read(path, v, sizeof v))
		return dflt;
	char *end;
	errno = 0;
	unsigned long long n = strtoull(v, &end, 10);
	return (errno || end == v) ? dflt : n;
}

static int be_state(void)
{
	char p[300];
	snprintf(p, sizeof p, "%s/state", C.be);
	return (int)xs_uint(p, XB_UNKNOWN);
}

static int fe_state(void)
{
	char p[128];
	snprintf(p, sizeof p, "%s/state", fedir);
	return (int)xs_uint(p, XB_UNKNOWN);
}

static void set_fe_state(const char *stage, int state)
{
	char p[128];
	snprintf(p, sizeof p, "%s/state", fedir);
	xs_write_or_die(stage, p, "%d", state);
}

static void sleep_ms(unsigned ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

/* Wait until the backend's state is in `want` (a bit mask of states); returns
 * the state reached, or the last seen if the time ran out (-1: the node is gone). */
static int wait_backend(unsigned want, double seconds)
{
	uint64_t end = now_ns() + (uint64_t)(seconds * 1e9);
	for (;;) {
		char p[300], v[16];
		snprintf(p, sizeof p, "%s/state", C.be);
		int st = xs_read(p, v, sizeof v) ? -1 : atoi(v);
		if (st >= 0 && (want & (1u << st)))
			return st;
		if (now_ns() >= end)
			return st;
		sleep_ms(20);
	}
}
#define BIT(s) (1u << (s))

/* ------------------------------------------------------------------ grants, events */
static void *grant_pages(unsigned count, grant_ref_t *grefs, const char *what)
{
	size_t sz = sizeof(struct ioctl_gntalloc_alloc_gref) + (count ? count - 1 : 0) * sizeof(uint32_t);
	struct ioctl_gntalloc_alloc_gref *a = calloc(1, sz);
	if (!a)
		fatal("connect", "out of memory");
	a->domid = (uint16_t)C.backend_id;
	a->flags = GNTALLOC_FLAG_WRITABLE; /* the backend writes responses and read data */
	a->count = count;
	if (ioctl(C.gfd, IOCTL_GNTALLOC_ALLOC_GREF, a) < 0) {
		int e = errno;
		char lim[32] = "?";
		FILE *f = fopen("/sys/module/xen_gntalloc/parameters/limit", "r");
		if (f) {
			if (!fgets(lim, sizeof lim, f))
				strcpy(lim, "?");
			lim[strcspn(lim, "\n")] = 0;
			fclose(f);
		}
		fatal("connect", "granting %u pages for the %s: %s (xen-gntalloc's limit is %s grants)", count, what,
		      strerror(e), lim);
	}
	void *p = mmap(NULL, (size_t)count * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, C.gfd, (off_t)a->index);
	if (p == MAP_FAILED)
		fatal("connect", "mapping the %u granted pages for the %s: %s", count, what, strerror(errno));
	memcpy(grefs, a->gref_ids, count * sizeof(uint32_t));
	free(a);
	return p;
}

static void notify(unsigned q)
{
	struct ioctl_evtchn_notify n = { .port = C.q[q].port };
	if (ioctl(C.efd, IOCTL_EVTCHN_NOTIFY, &n) < 0)
		fatal("io", "IOCTL_EVTCHN_NOTIFY port %u: %s", C.q[q].port, strerror(errno));
	ST.notifies++;
}

/* ------------------------------------------------------------------ the ring */
/* Slots are numbered over the queues: queue q has slots q*depth .. q*depth +
 * depth - 1, so each queue's ring is kept as full as a single ring is, and a
 * request's id (its slot) is unique over the connection. */
static unsigned queue_of(unsigned si)
{
	return si / depth;
}

static union blkif_request *req_at(unsigned q, RING_IDX i)
{
	return &C.q[q].sring->ring[i & (C.size - 1)].req;
}

/* where slot si's next request goes */
static union blkif_request *req_next(unsigned si)
{
	unsigned q = queue_of(si);
	return req_at(q, C.q[q].req_prod_pvt);
}

static uint8_t *slot_page(unsigned si, unsigned seg)
{
	return C.data + ((size_t)si * O.segments + seg) * PAGE;
}

static grant_ref_t slot_gref(unsigned si, unsigned seg)
{
	return C.data_grefs[(size_t)si * O.segments + seg];
}

/* RING_PUSH_REQUESTS_AND_CHECK_NOTIFY (ring.h), on every queue with new
 * requests: the requests are written before req_prod moves (release), and
 * req_event is read only after req_prod is visible (a full barrier: a store
 * then a load). `force`: notify anyway, the aggressive frontend's habit.
 * push_queue(): queue q only. */
static void push_queue(unsigned q, bool force)
{
	struct queue *Q = &C.q[q];
	RING_IDX old = __atomic_load_n(&Q->sring->req_prod, __ATOMIC_RELAXED);
	RING_IDX new = Q->req_prod_pvt;
	if (new == old)
		return;
	__atomic_store_n(&Q->sring->req_prod, new, __ATOMIC_RELEASE);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	RING_IDX ev = __atomic_load_n(&Q->sring->req_event, __ATOMIC_RELAXED);
	bool needed = (RING_IDX)(new - ev) < (RING_IDX)(new - old);
	if (force || needed)
		notify(q);
}

static void push(bool force)
{
	for (unsigned q = 0; q < C.nq; q++)
		push_queue(q, force);
}

static void mark_submitted(unsigned si, uint8_t op, uint64_t sector, uint32_t nsect, uint8_t kind)
{
	struct slot *s = &S[si];
	unsigned q = queue_of(si);
	if (s->busy) /* slot-reuse: a second request with the id of one still out */
		s->extra++;
	s->busy = true;
	s->answered = false;
	s->kind = kind;
	s->op = op;
	s->sector = sector;
	s->nsect = nsect;
	s->t0 = stamp(); /* the pass's time (see pass_begin()) */
	C.q[q].req_prod_pvt++;
	C.q[q].inflight++;
	C.inflight++;
	q_requests[q]++;
	ST.requests++;
	conn_now()->requests++;
	peak_inflight(s->t0);
}

/* A well-formed request of slot `si` at the next free ring index. */
static void put_request(unsigned si, uint8_t op, uint64_t sector)
{
	union blkif_request *r = req_next(si);
	uint32_t nsect = nsect_req;
	memset(r, 0, sizeof *r);
	if (op == OP_FLUSH) {
		r->rw.operation = BLKIF_OP_FLUSH_DISKCACHE;
		r->rw.nr_segments = 0;
		r->rw.handle = (uint16_t)O.devid;
		r->rw.id = si;
		sector = 0;
		nsect = 0;
	} else if (op == OP_DISCARD) {
		r->discard.operation = BLKIF_OP_DISCARD;
		r->discard.handle = (uint16_t)O.devid;
		r->discard.id = si;
		r->discard.sector_number = sector;
		r->discard.nr_sectors = nsect;
	} else if (C.ipp) {
		r->indirect.operation = BLKIF_OP_INDIRECT;
		r->indirect.indirect_op = op == OP_READ ? BLKIF_OP_READ : BLKIF_OP_WRITE;
		r->indirect.nr_segments = (uint16_t)O.segments;
		r->indirect.id = si;
		r->indirect.sector_number = sector;
		r->indirect.handle = (uint16_t)O.devid;
		for (unsigned i = 0; i < C.ipp; i++)
			r->indirect.indirect_grefs[i] = C.ind_grefs[(size_t)si * C.ipp + i];
	} else {
		r->rw.operation = op == OP_READ ? BLKIF_OP_READ : BLKIF_OP_WRITE;
		r->rw.nr_segments = (uint8_t)O.segments;
		r->rw.handle = (uint16_t)O.devid;
		r->rw.id = si;
		r->rw.sector_number = sector;
		for (unsigned i = 0; i < O.segments; i++) {
			r->rw.seg[i].gref = slot_gref(si, i);
			r->rw.seg[i].first_sect = 0;
			r->rw.seg[i].last_sect = SECTORS_PER_PAGE - 1;
		}
	}
	mark_submitted(si, op, sector, nsect, K_NORMAL);
}

/* ------------------------------------------------------------------ counters */
static unsigned hist_bucket(uint64_t us)
{ /* log-linear: exact below 64 us, then 32 buckets per power of two (3 % wide) */
	if (us < 64)
		return (unsigned)us;
	unsigned msb = 63u - (unsigned)__builtin_clzll(us);
	unsigned b = 64 + (msb - 6) * 32 + (unsigned)((us >> (msb - 5)) & 31);
	return b < HIST_BUCKETS ? b : HIST_BUCKETS - 1;
}

static double hist_value_us(unsigned b)
{ /* the middle of bucket b */
	if (b < 64)
		return b;
	unsigned msb = (b - 64) / 32 + 6, sub = (b - 64) % 32;
	double lo = (double)((uint64_t)(32 + sub) << (msb - 5));
	return lo + (double)(1ull << (msb - 5)) / 2;
}

static double percentile_ms(double p)
{
	if (!ST.lat_n)
		return 0;
	uint64_t rank = (uint64_t)(p * (double)ST.lat_n + 0.999999);
	if (rank < 1)
		rank = 1;
	uint64_t seen = 0;
	for (unsigned b = 0; b < HIST_BUCKETS; b++) {
		seen += ST.hist[b];
		if (seen >= rank) {
			double v = hist_value_us(b);
			return (v > (double)ST.lat_max_us ? (double)ST.lat_max_us : v) / 1000.0;
		}
	}
	return (double)ST.lat_max_us / 1000.0;
}

static size_t series_index(uint64_t t)
{
	size_t i = t > t_io0 ? (size_t)((t - t_io0) / 1000000000ull) : 0;
	if (i >= ST.series_cap) {
		size_t cap = ST.series_cap ? ST.series_cap * 2 : 256;
		while (cap <= i)
			cap *= 2;
		ST.series_done = realloc(ST.series_done, cap * sizeof *ST.series_done);
		ST.series_inflight = realloc(ST.series_inflight, cap * sizeof *ST.series_inflight);
		if (!ST.series_done || !ST.series_inflight)
			fatal("io", "out of memory for the per-second series");
		memset(ST.series_done + ST.series_cap, 0, (cap - ST.series_cap) * sizeof *ST.series_done);
		memset(ST.series_inflight + ST.series_cap, 0, (cap - ST.series_cap) * sizeof *ST.series_inflight);
		ST.series_cap = cap;
	}
	return i;
}

/* The most requests in flight in the second of time t. */
static void peak_inflight(uint64_t t)
{
	size_t i = series_index(t);
	if (C.inflight > ST.series_inflight[i])
		ST.series_inflight[i] = C.inflight;
}

/* Called often: the series reaches the current second (a second without a
 * call had the count in flight now), and every 200 ms the stat file is
 * rewritten. tick_at(): at time t, a pass's (no clock read of its own). */
static void tick_at(uint64_t t)
{
	size_t i = series_index(t);
	for (size_t k = ST.series_len; k < i; k++)
		if (C.inflight > ST.series_inflight[k])
			ST.series_inflight[k] = C.inflight;
	peak_inflight(t);
	if (ST.series_len < i + 1)
		ST.series_len = i + 1;
	if (t >= next_stat) {
		write_stat();
		next_stat = t + 200000000ull;
	}
}

static void tick(void)
{
	tick_at(now_ns());
}

/* The lab's guest sampler reads this (lab/ringfront.py parse_stat): one line
 * of key=value words, written aside and renamed so a reader never sees half.
 * completed, reads, writes, flushes, discards and the sectors are counted as
 * blkback counts them (struct conncount), summed over the connections;
 * inflight is what is on the ring now, oldest_ms the age of the oldest of
 * it; conn is the connection's number and conn_completed what it completed. */
static void write_stat(void)
{
	if (!O.stat[0])
		return;
	char tmp[300], line[512];
	uint64_t t = now_ns(), oldest = t;
	for (unsigned i = 0; i < nslots; i++)
		if (S[i].busy && S[i].t0 < oldest)
			oldest = S[i].t0;
	snprintf(tmp, sizeof tmp, "%s.tmp", O.stat);
	int n = snprintf(line, sizeof line,
			 "blkring conn=%u completed=%" PRIu64 " inflight=%u reads=%" PRIu64 " writes=%" PRIu64
			 " flushes=%" PRIu64 " discards=%" PRIu64 " sectors_read=%" PRIu64 " sectors_written=%" PRIu64
			 " conn_completed=%" PRIu64 " oldest_ms=%" PRIu64 " errors=%" PRIu64 "\n",
			 C.number, ST.acc.completed, C.inflight, ST.acc.reads, ST.acc.writes, ST.acc.flushes,
			 ST.acc.discards, ST.acc.sectors_read, ST.acc.sectors_written, ST.conn_completed,
			 (uint64_t)((t - oldest) / 1000000u), ST.unexpected_errors + ST.verify_mismatches);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return;
	ssize_t w = write(fd, line, (size_t)n);
	close(fd);
	if (w == n)
		rename(tmp, O.stat);
}

/* ------------------------------------------------------------------ verify */
#define PATTERN_MAGIC 0x31474e49524b4c42ull /* "BLKRING1" */

static uint64_t splitmix(uint64_t *x)
{
	uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

/* Each 512-byte sector says what it is (magic, run nonce, sector, generation)
 * and the rest is a stream seeded by those: a sector from another place,
 * another run or an older write does not match. */
static void pattern_sector(uint64_t *w, uint64_t sector, uint64_t gen)
{
	uint64_t x = nonce ^ (sector * 0x9E3779B97F4A7C15ull) ^ (gen << 1);
	w[0] = PATTERN_MAGIC;
	w[1] = nonce;
	w[2] = sector;
	w[3] = gen;
	for (unsigned i = 4; i < SECTOR / 8; i++)
		w[i] = splitmix(&x);
}

static void fill_pattern(unsigned si, uint64_t sector, uint64_t gen)
{
	for (unsigned s = 0; s < nsect_req; s++)
		pattern_sector((uint64_t *)(void *)(slot_page(si, s / SECTORS_PER_PAGE) + (s % SECTORS_PER_PAGE) * SECTOR),
			       sector + s, gen);
}

static bool check_pattern(unsigned si, uint64_t sector, uint64_t gen, uint64_t *bad_sector)
{
	uint64_t want[SECTOR / 8];
	for (unsigned s = 0; s < nsect_req; s++) {
		pattern_sector(want, sector + s, gen);
		if (memcmp(want, slot_page(si, s / SECTORS_PER_PAGE) + (s % SECTORS_PER_PAGE) * SECTOR, SECTOR)) {
			*bad_sector = sector + s;
			return false;
		}
	}
	return true;
}

/* the next block for a verify write, never one another slot holds */
static uint64_t verify_block(void)
{
	for (;;) {
		uint64_t b = verify_next++ % nblocks;
		bool held = false;
		for (unsigned i = 0; i < nslots && !held; i++)
			held = S[i].busy && S[i].sector == b * nsect_req;
		if (!held)
			return b;
	}
}

/* ------------------------------------------------------------------ what to send next */
static uint8_t pick_op(void)
{
	if (O.op != OP_MIXED)
		return (uint8_t)O.op;
	uint64_t r = rnd();
	/* 1 in 16 a flush, 1 in 16 a discard, when the backend offers them */
	if (C.flush && (r & 15) == 0)
		return OP_FLUSH;
	if (C.discard && (r & 15) == 1)
		return OP_DISCARD;
	return (r >> 8) % 100 < O.rwmixread ? OP_READ : OP_WRITE;
}

/* Queue slot `si`'s next request (not pushed). */
static void next_request(unsigned si)
{
	if (O.verify) {
		struct slot *s = &S[si];
		if (s->answered && s->vphase == 0 && s->status == BLKIF_RSP_OKAY && s->op == OP_WRITE) {
			memset(slot_page(si, 0), 0, (size_t)O.segments * PAGE); /* a read that does nothing must not pass */
			put_request(si, OP_READ, s->sector);
			s->vphase = 1;
			return;
		}
		uint64_t sector = verify_block() * nsect_req;
		s->gen++;
		fill_pattern(si, sector, s->gen);
		put_request(si, OP_WRITE, sector);
		s->vphase = 0;
		return;
	}
	put_request(si, pick_op(), (rnd() % nblocks) * nsect_req);
}

/* ------------------------------------------------------------------ responses */
/* A response for slot si. Returns true when the slot is free again: a slot
 * with a reused id (slot-reuse) has one response per request, and only the
 * last one frees it; each is counted as blkback counts each request. */
static bool complete(unsigned si, int16_t status)
{
	struct slot *s = &S[si];
	uint64_t t = stamp(); /* the pass's time: the latency's granularity is one pass */
	unsigned q = queue_of(si);
	bool last = s->extra == 0;
	if (last) {
		s->busy = false;
		s->answered = true;
	} else {
		s->extra--;
	}
	s->status = status;
	C.q[q].inflight--;
	q_completed[q]++;
	C.inflight--;
	ST.total_completed++;
	ST.series_done[series_index(t)]++;
	ST.acc.completed++;
	ST.conn_completed++;
	struct conninfo *ci = conn_now();
	if (status == BLKIF_RSP_OKAY) {
		ST.okay++;
		ci->okay++;
	} else if (status == BLKIF_RSP_ERROR) {
		ST.error++;
		ci->error++;
	} else {
		if (status == BLKIF_RSP_EOPNOTSUPP)
			ST.eopnotsupp++;
		else
			ST.other_status++;
		ci->other++;
	}
	if (s->op < 4)
		ST.completed_by_op[s->op]++;
	/* blkback counts a request by its operation when it takes it, and its
	 * sectors once the bios went out: malformed requests never get there,
	 * an orphan only if it was served */
	bool sectors = s->kind == K_NORMAL || (s->kind == K_ORPHAN && status == BLKIF_RSP_OKAY);
	switch (s->op) {
	case OP_READ:
		ST.acc.reads++;
		if (sectors)
			ST.acc.sectors_read += s->nsect;
		break;
	case OP_WRITE:
		ST.acc.writes++;
		if (sectors)
			ST.acc.sectors_written += s->nsect;
		break;
	case OP_FLUSH:
		ST.acc.flushes++;
		break;
	case OP_DISCARD:
		ST.acc.discards++;
		break;
	}
	if (s->kind != K_NORMAL)
		return last;
	uint64_t us = t > s->t0 ? (t - s->t0) / 1000 : 0;
	ST.hist[hist_bucket(us)]++;
	ST.lat_n++;
	ST.lat_sum_us += us;
	if (us > ST.lat_max_us)
		ST.lat_max_us = us;
	if (status != BLKIF_RSP_OKAY) {
		ST.unexpected_errors++;
		return last;
	}
	if (s->op == OP_READ)
		ST.bytes_read += (uint64_t)s->nsect * SECTOR;
	else if (s->op == OP_WRITE)
		ST.bytes_written += (uint64_t)s->nsect * SECTOR;
	if (O.verify && s->op == OP_READ && s->vphase == 1) {
		uint64_t bad = 0;
		ST.verify_checked++;
		if (!check_pattern(si, s->sector, s->gen, &bad)) {
			if (!ST.verify_mismatches)
				ST.first_mismatch_sector = bad;
			ST.verify_mismatches++;
		}
		s->vphase = 0;
		s->answered = false; /* the next request of this slot is a new write */
	}
	return last;
}

/* RING_FOR_EACH response, on every queue: rsp_prod is read with acquire so
 * the responses are read after it. A backend that produces more responses than
 * there are requests, or answers an id no request of that queue had, is
 * broken: counted and named. `then` gets each slot a response freed. Every
 * response of one call is stamped with one clock read: the caller's pass, or
 * one opened here at the first response (none read when there is none). */
static unsigned reap(void (*then)(unsigned si))
{
	unsigned n = 0;
	bool own = false;
	for (unsigned q = 0; q < C.nq; q++) {
		struct queue *Q = &C.q[q];
		RING_IDX rp = __atomic_load_n(&Q->sring->rsp_prod, __ATOMIC_ACQUIRE);
		RING_IDX outstanding = Q->req_prod_pvt - Q->rsp_cons;
		if ((RING_IDX)(rp - Q->rsp_cons) > outstanding) {
			ST.bogus_responses++;
			fatal("io", "queue %u: the backend's rsp_prod %u is %u past our rsp_cons %u with only %u requests "
			      "on the ring", q, rp, (unsigned)(rp - Q->rsp_cons), Q->rsp_cons, outstanding);
		}
		if (Q->rsp_cons != rp && !pass_open) {
			pass_begin();
			own = true;
		}
		while (Q->rsp_cons != rp) {
			struct blkif_response rsp;
			memcpy(&rsp, &Q->sring->ring[Q->rsp_cons & (C.size - 1)].rsp, sizeof rsp);
			Q->rsp_cons++;
			n++;
			if (rsp.id >= nslots || !S[rsp.id].busy || queue_of((unsigned)rsp.id) != q) {
				ST.bogus_responses++;
				Q->inflight--; /* it took a ring slot all the same */
				C.inflight--;
				continue;
			}
			if (complete((unsigned)rsp.id, rsp.status) && then)
				then((unsigned)rsp.id);
		}
	}
	if (own)
		pass_end();
	return n;
}

static bool responses_waiting(void)
{
	for (unsigned q = 0; q < C.nq; q++)
		if (__atomic_load_n(&C.q[q].sring->rsp_prod, __ATOMIC_ACQUIRE) != C.q[q].rsp_cons)
			return true;
	return false;
}

/* Sleep until the backend may have responded: ask for an event at the next
 * response (rsp_event, as RING_FINAL_CHECK_FOR_RESPONSES does), check once
 * more after a full barrier, then wait on the event channel. Reading it
 * returns the ports that fired (masked); writing them back unmasks. */
static void wait_responses(unsigned timeout_ms)
{
	if (O.busy_poll)
		return;
	for (unsigned q = 0; q < C.nq; q++)
		__atomic_store_n(&C.q[q].sring->rsp_event, C.q[q].rsp_cons + 1, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (responses_waiting())
		return;
	struct pollfd p = { .fd = C.efd, .events = POLLIN };
	if (poll(&p, 1, (int)timeout_ms) <= 0)
		return;
	uint32_t ports[64];
	ssize_t r = read(C.efd, ports, sizeof ports);
	if (r > 0) {
		ST.events += (uint64_t)r / sizeof(uint32_t);
		if (write(C.efd, ports, (size_t)r) != r)
			fatal("io", "unmasking event channel port %u: %s", ports[0], strerror(errno));
	}
}

/* until `si` (or, with si < 0, every request) is answered or `seconds` pass */
static bool wait_answered(int si, double seconds, void (*then)(unsigned))
{
	uint64_t end = now_ns() + (uint64_t)(seconds * 1e9);
	for (;;) {
		uint64_t t = pass_begin(); /* one clock read a pass: stamps, tick and deadline */
		reap(then);
		tick_at(t);
		pass_end();
		if (si >= 0 ? S[si].answered : C.inflight == 0)
			return true;
		if (t >= end)
			return false;
		wait_responses(50);
	}
}

static unsigned pop_free(void)
{
	return freelist[--nfree];
}

static void rebuild_freelist(void)
{
	nfree = 0;
	for (unsigned i = nslots; i-- > 0;)
		if (!S[i].busy)
			freelist[nfree++] = i;
}

/* ------------------------------------------------------------------ connect / close */
/* Let go of the data pages, the grant file and the port, keeping the ring
 * page mapped (the kill case reads the backend's last responses from it). */
static void drop_all_but_ring(void)
{
	if (C.data)
		munmap(C.data, C.ndata * PAGE);
	if (C.ind)
		munmap(C.ind, C.nind * PAGE);
	C.data = C.ind = NULL;
	free(C.data_grefs);
	free(C.ind_grefs);
	C.data_grefs = C.ind_grefs = NULL;
	/* closing the files frees what is left: the port, and the grants the
	 * backend no longer maps (gntalloc keeps a still-mapped page until it is
	 * unmapped) */
	if (C.efd >= 0)
		close(C.efd);
	if (C.gfd >= 0)
		close(C.gfd);
	C.efd = C.gfd = -1;
}

static void conn_free(void)
{
	if (!C.live)
		return;
	drop_all_but_ring();
	for (unsigned q = 0; q < MAX_QUEUES; q++) {
		if (C.q[q].sring)
			munmap(C.q[q].sring, (size_t)C.pages * PAGE);
		C.q[q].sring = NULL;
	}
	C.live = false;
}

static bool vbd_bound_in_guest(void)
{
	char p[128];
	snprintf(p, sizeof p, "/sys/bus/xen/devices/vbd-%u/driver", O.devid);
	return access(p, F_OK) == 0;
}

/* The largest ring the run asks for, in entries (one queue's). */
static unsigned largest_ring(void)
{
	unsigned order = O.ring_order;
	for (unsigned i = 0; i < O.nreconnect; i++)
		if (O.reconnect_orders[i] > order)
			order = O.reconnect_orders[i];
	return ring_entries(1u << order);
}

/* The ring nodes an earlier connection (this run's or an earlier run's) may
 * have left: blkback's connect_ring() reads ring-page-order (absent: 0) and
 * then ring-refN or ring-ref, so a stale ring-page-order beside a fresh
 * ring-ref would make it map an old connection's grant refs (refs the kernel
 * hands out again at once). Real frontends keep one ring size, so they never
 * meet this; a frontend that changes it must clean up. The same holds for the
 * queues: connect_ring() reads multi-queue-num-queues (absent: 1) and then each
 * queue-<i>/ directory, so a stale count would send it to old queues' refs. */
static bool rm_ring_nodes(char *why, size_t cap)
{
	char p[128];
	for (int i = -4; i < 16 + MAX_QUEUES; i++) {
		if (i == -4)
			snprintf(p, sizeof p, "%s/multi-queue-num-queues", fedir);
		else if (i == -3)
			snprintf(p, sizeof p, "%s/event-channel", fedir);
		else if (i == -2)
			snprintf(p, sizeof p, "%s/ring-page-order", fedir);
		else if (i == -1)
			snprintf(p, sizeof p, "%s/ring-ref", fedir);
		else if (i < 16)
			snprintf(p, sizeof p, "%s/ring-ref%d", fedir, i);
		else /* the directory and everything in it */
			snprintf(p, sizeof p, "%s/queue-%d", fedir, i - 16);
		int e = xs_rm(p);
		if (e && e != -ENOENT) {
			snprintf(why, cap, "xenstore rm %s (a node of an earlier connection): %s", p, strerror(-e));
			return false;
		}
	}
	return true;
}

/* Connect as blkfront's talk_to_blkback does: ring and event channel
 * first, then the nodes, then Initialised; the backend connects; then
 * Connected. `first`: refuse a device another frontend already has. The
 * ring asks for `cur_order` (conn_begin()), capped at the backend's
 * max-ring-page-order. What the lab got wrong is fatal here; what the
 * backend refused returns false with `why`. */
static bool conn_open(bool first, char *why, size_t cap)
{
	char p[320], v[sizeof C.be];
	int e;
	struct conninfo *ci = conn_now();
	snprintf(p, sizeof p, "%s/backend", fedir);
	if ((e = xs_read(p, v, sizeof v)))
		fatal("connect", "no vbd %u in this domain's xenstore (%s: %s)", O.devid, p, strerror(-e));
	snprintf(C.be, sizeof C.be, "%s", v);
	snprintf(p, sizeof p, "%s/backend-id", fedir);
	C.backend_id = (unsigned)xs_uint(p, 0);
	if (first) {
		int bs = be_state(), fs = fe_state();
		if (vbd_bound_in_guest() || bs == XB_CONNECTED || fs == XB_INITIALISED || fs == XB_CONNECTED)
			fatal("refused",
			      "vbd %u is not ours: frontend state %d, backend state %d, kernel driver %s; another "
			      "frontend (the kernel's blkfront?) has it",
			      O.devid, fs, bs, vbd_bound_in_guest() ? "bound" : "not bound");
		if (fs == XB_CLOSED && bs == XB_CLOSED) /* an earlier run closed it: ask for a reconnect */
			set_fe_state("connect", XB_INITIALISING);
	}
	int st = wait_backend(BIT(XB_INITWAIT), O.connect_timeout);
	if (st != XB_INITWAIT) {
		snprintf(why, cap, "the backend %s stayed in state %d, never InitWait (2), within %.0fs", C.be, st,
			 O.connect_timeout);
		return false;
	}
	snprintf(p, sizeof p, "%s/max-ring-page-order", C.be);
	C.max_order = (unsigned)xs_uint(p, 0);
	snprintf(p, sizeof p, "%s/feature-max-indirect-segments", C.be);
	C.max_indirect = (unsigned)xs_uint(p, 0);
	snprintf(p, sizeof p, "%s/feature-persistent", C.be);
	C.be_persistent = xs_uint(p, 0) == 1;
	snprintf(p, sizeof p, "%s/multi-queue-max-queues", C.be); /* absent: one ring */
	C.max_queues = (unsigned)xs_uint(p, 1);
	if (C.max_queues < 1)
		C.max_queues = 1;

	unsigned order = cur_order < C.max_order ? cur_order : C.max_order;
	C.pages = 1u << order;
	C.size = ring_entries(C.pages);
	C.nq = O.queues < C.max_queues ? O.queues : C.max_queues;
	if (first) {
		slot_cap = largest_ring();
		if (O.depth && O.depth < slot_cap)
			slot_cap = O.depth;
		slot_cap *= O.queues; /* room for every queue asked for */
		S = calloc(slot_cap, sizeof *S);
		freelist = calloc(slot_cap, sizeof *freelist);
		if (!S || !freelist)
			fatal("connect", "out of memory");
	}
	/* each connection keeps its own ring full (or --depth of it) */
	depth = O.depth && O.depth < C.size ? O.depth : C.size;
	nslots = depth * C.nq;
	ci->max_order = C.max_order;
	ci->allowed_pages = ci->pages = C.pages;
	ci->entries = C.size;
	ci->depth = depth;
	ci->queues = C.nq;
	C.ipp = 0;
	if (O.segments > BLKIF_MAX_SEGMENTS_PER_REQUEST) {
		if (C.max_indirect < O.segments)
			fatal("connect", "%u segments per request need indirect descriptors; the backend offers %u "
			      "(feature-max-indirect-segments)", O.segments, C.max_indirect);
		C.ipp = (unsigned)((O.segments + SEGS_PER_INDIRECT_FRAME - 1) / SEGS_PER_INDIRECT_FRAME);
	}

	if ((C.gfd = open("/dev/xen/gntalloc", O_RDWR | O_CLOEXEC)) < 0)
		fatal("setup", "/dev/xen/gntalloc: %s (is xen-gntalloc loaded?)", strerror(errno));
	if ((C.efd = open("/dev/xen/evtchn", O_RDWR | O_CLOEXEC)) < 0)
		fatal("setup", "/dev/xen/evtchn: %s (is xen-evtchn loaded?)", strerror(errno));
	C.live = true;
	for (unsigned q = 0; q < C.nq; q++) {
		struct queue *Q = &C.q[q];
		Q->sring = grant_pages(C.pages, Q->ring_grefs, "ring");
		/* SHARED_RING_INIT and FRONT_RING_INIT (the pages come zeroed) */
		memset(Q->sring, 0, (size_t)C.pages * PAGE);
		Q->sring->req_event = Q->sring->rsp_event = 1;
		Q->req_prod_pvt = Q->rsp_cons = 0;
		Q->inflight = 0;
	}
	C.inflight = 0;

	C.ndata = (size_t)nslots * O.segments;
	C.data_grefs = calloc(C.ndata, sizeof *C.data_grefs);
	if (!C.data_grefs)
		fatal("connect", "out of memory");
	C.data = grant_pages((unsigned)C.ndata, C.data_grefs, "data pages");
	/* writes that are not verified carry a constant, recognisable pattern */
	for (size_t i = 0; i < C.ndata * PAGE / 8; i++)
		((uint64_t *)(void *)C.data)[i] = PATTERN_MAGIC ^ i;
	if (C.ipp) {
		C.nind = (size_t)nslots * C.ipp;
		C.ind_grefs = calloc(C.nind, sizeof *C.ind_grefs);
		if (!C.ind_grefs)
			fatal("connect", "out of memory");
		C.ind = grant_pages((unsigned)C.nind, C.ind_grefs, "indirect pages");
		/* each slot's descriptors never change: its own data pages in order */
		for (unsigned si = 0; si < nslots; si++)
			for (unsigned i = 0; i < O.segments; i++) {
				struct blkif_request_segment *seg =
					(struct blkif_request_segment *)(void *)(C.ind + ((size_t)si * C.ipp) * PAGE) + i;
				seg->gref = slot_gref(si, i);
				seg->first_sect = 0;
				seg->last_sect = SECTORS_PER_PAGE - 1;
			}
	}

	for (unsigned q = 0; q < C.nq; q++) {
		struct ioctl_evtchn_bind_unbound_port b = { .remote_domain = C.backend_id };
		int port = ioctl(C.efd, IOCTL_EVTCHN_BIND_UNBOUND_PORT, &b);
		if (port < 0)
			fatal("connect", "IOCTL_EVTCHN_BIND_UNBOUND_PORT for domain %u (queue %u): %s", C.backend_id, q,
			      strerror(errno));
		C.q[q].port = (uint32_t)port;
	}

	if (!rm_ring_nodes(why, cap))
		return false;
	/* as blkfront's talk_to_blkback(): ring-page-order at the device's level,
	 * the refs and the port of one queue there too, of several in queue-<i>/ */
	if (C.pages > 1) {
		snprintf(p, sizeof p, "%s/ring-page-order", fedir);
		xs_write_or_die("connect", p, "%u", order);
	}
	if (C.nq > 1) {
		snprintf(p, sizeof p, "%s/multi-queue-num-queues", fedir);
		xs_write_or_die("connect", p, "%u", C.nq);
	}
	for (unsigned q = 0; q < C.nq; q++) {
		char dir[96];
		if (C.nq > 1)
			snprintf(dir, sizeof dir, "%s/queue-%u", fedir, q);
		else
			snprintf(dir, sizeof dir, "%s", fedir);
		if (C.pages == 1) {
			snprintf(p, sizeof p, "%s/ring-ref", dir);
			xs_write_or_die("connect", p, "%u", C.q[q].ring_grefs[0]);
		} else {
			for (unsigned i = 0; i < C.pages; i++) {
				snprintf(p, sizeof p, "%s/ring-ref%u", dir, i);
				xs_write_or_die("connect", p, "%u", C.q[q].ring_grefs[i]);
			}
		}
		snprintf(p, sizeof p, "%s/event-channel", dir);
		xs_write_or_die("connect", p, "%u", C.q[q].port);
	}
	snprintf(p, sizeof p, "%s/protocol", fedir);
	xs_write_or_die("connect", p, "x86_64-abi");
	snprintf(p, sizeof p, "%s/feature-persistent", fedir);
	xs_write_or_die("connect", p, "%d", O.persistent ? 1 : 0);
	set_fe_state("connect", XB_INITIALISED);

	st = wait_backend(BIT(XB_CONNECTED) | BIT(XB_CLOSING) | BIT(XB_CLOSED), O.connect_timeout);
	if (st != XB_CONNECTED) {
		/* xenbus_dev_fatal() writes "<errno> <message>" to error/<nodename>
		 * in the backend's domain; a guest may not be allowed to read it */
		char err[300], raw[161];
		const char *rel = strstr(C.be, "/backend/");
		snprintf(p, sizeof p, "/local/domain/%u/error%.255s/error", C.backend_id, rel ? rel : "/?");
		if (xs_read(p, raw, sizeof raw))
			snprintf(err, sizeof err, "the backend's error node %.120s is not readable here", p);
		else
			snprintf(err, sizeof err, "%.120s: '%s'", p, raw);
		snprintf(why, cap, "the backend %.80s reached state %d%s, not Connected (4), within %.0fs (%.220s)", C.be, st,
			 st == XB_CLOSING ? " (Closing)" : st == XB_CLOSED ? " (Closed)" : "", O.connect_timeout, err);
		return false;
	}
	snprintf(p, sizeof p, "%s/sectors", C.be);
	C.sectors = xs_uint(p, 0);
	snprintf(p, sizeof p, "%s/sector-size", C.be);
	C.sector_size = (unsigned)xs_uint(p, 512);
	snprintf(p, sizeof p, "%s/feature-flush-cache", C.be);
	C.flush = xs_uint(p, 0) == 1;
	snprintf(p, sizeof p, "%s/feature-discard", C.be);
	C.discard = xs_uint(p, 0) == 1;
	snprintf(p, sizeof p, "%s/feature-persistent", C.be); /* some kernels write it only now */
	C.be_persistent = xs_uint(p, 0) == 1;
	if (!C.sectors) {
		snprintf(why, cap, "the backend %s gave no size (sectors)", C.be);
		return false;
	}
	set_fe_state("connect", XB_CONNECTED);
	C.number++;
	ci->connected = true;
	ST.conn_completed = 0;
	for (unsigned i = 0; i < slot_cap; i++) {
		S[i].busy = S[i].answered = false;
		S[i].extra = 0;
	}
	rebuild_freelist();
	return true;
}

/* Closing (5) then Closed (6), each answered by the backend: blkback
 * disconnects the ring at Closed. Returns false if it did not follow. */
static bool conn_close(char *why, size_t cap)
{
	set_fe_state("close", XB_CLOSING);
	int st = wait_backend(BIT(XB_CLOSING) | BIT(XB_CLOSED), O.close_timeout);
	if (st != XB_CLOSING && st != XB_CLOSED) {
		snprintf(why, cap, "backend in state %d %.0fs after the frontend wrote Closing", st, O.close_timeout);
		return false;
	}
	set_fe_state("close", XB_CLOSED);
	st = wait_backend(BIT(XB_CLOSED), O.close_timeout);
	if (st != XB_CLOSED) {
		snprintf(why, cap, "backend in state %d %.0fs after the frontend wrote Closed", st, O.close_timeout);
		return false;
	}
	conn_free();
	return true;
}

/* Idle for --settle seconds, the stat file still written. */
static void settle(void)
{
	uint64_t until = now_ns() + (uint64_t)(O.settle * 1e9);
	while (now_ns() < until) {
		tick();
		sleep_ms(50);
	}
	tick();
}

/* Which ring size the backend serves, measured on a fresh connection of more
 * than one page: the backend puts response i in slot i % (its entries), and
 * nothing in xenstore says what it mapped. Requests go one at a time; each is
 * written to its slot and to the slot every smaller ring would read it from
 * (so whatever ring the backend believes in, it reads a sound request), and
 * the slot its response landed in names the size. Slots first differ at index
 * 32 (one page against more), the last at entries / 2. A well-behaved backend
 * costs entries / 2 + 1 plain reads, counted as any other. */
#define PROBE_ID 0x5052000000000000ull /* "PR" in the top bytes, the ring index below */
static bool probe_queue(unsigned q, char *why, size_t cap)
{
	const unsigned smallest = ring_entries(1);
	const unsigned si = q * depth; /* the queue's first slot */
	struct conninfo *ci = conn_now();
	struct queue *Q = &C.q[q];
	char qname[24] = "";
	if (C.nq > 1)
		snprintf(qname, sizeof qname, " of queue %u", q);
	for (RING_IDX at = Q->req_prod_pvt; C.size > smallest && at <= C.size / 2; at = Q->req_prod_pvt) {
		put_request(si, OP_READ, (rnd() % nblocks) * nsect_req);
		union blkif_request *r = req_at(q, at);
		r->rw.id = PROBE_ID | at; /* at offset 8 in every request layout */
		for (unsigned s = smallest; s < C.size; s *= 2)
			if ((at & (s - 1)) != (at & (C.size - 1)))
				memcpy(&Q->sring->ring[at & (s - 1)].req, r, sizeof *r);
		push(true);
		uint64_t end = now_ns() + (uint64_t)(O.connect_timeout * 1e9);
		while (__atomic_load_n(&Q->sring->rsp_prod, __ATOMIC_ACQUIRE) == Q->rsp_cons) {
			if (stop_requested)
				return true; /* the run ends: the drain collects this request */
			if (now_ns() >= end) {
				snprintf(why, cap, "ring-size probe: request %u of a %u-entry ring%s got no response within %.0fs",
					 at, C.size, qname, O.connect_timeout);
				return false;
			}
			tick();
			wait_responses(50);
		}
		RING_IDX rp = __atomic_load_n(&Q->sring->rsp_prod, __ATOMIC_ACQUIRE);
		if (rp - Q->rsp_cons != 1) {
			ST.bogus_responses++;
			snprintf(why, cap, "ring-size probe: rsp_prod%s moved %u for one request (index %u)", qname,
				 (unsigned)(rp - Q->rsp_cons), at);
			return false;
		}
		unsigned found = 0; /* the largest ring whose slot holds the response */
		for (unsigned s = C.size; s >= smallest && !found; s /= 2) {
			uint64_t id;
			memcpy(&id, &Q->sring->ring[at & (s - 1)].rsp.id, sizeof id);
			if (id == (PROBE_ID | at))
				found = s;
		}
		Q->rsp_cons++;
		if (!found) {
			ST.bogus_responses++;
			Q->inflight--;
			C.inflight--;
			S[si].busy = false;
			snprintf(why, cap, "ring-size probe: the response to request %u%s is in no slot a ring of %u..%u "
				 "entries would put it in", at, qname, smallest, C.size);
			return false;
		}
		struct blkif_response rsp;
		memcpy(&rsp, &Q->sring->ring[at & (found - 1)].rsp, sizeof rsp);
		complete(si, rsp.status);
		if (found != C.size) {
			ci->entries = found;
			ci->pages = found / smallest;
			snprintf(why, cap,
				 "the backend serves a ring%s of %u entries (%u page%s), not the %u pages (%u entries) the "
				 "frontend granted (ring-page-order %u asked, the backend's max-ring-page-order %u allows "
				 "it): the response to request %u landed in slot %u, not %u",
				 qname, found, ci->pages, ci->pages == 1 ? "" : "s", C.pages, C.size, ci->requested_order,
				 C.max_order, at, at & (found - 1), at & (C.size - 1));
			return false;
		}
	}
	S[si].answered = false;
	return true;
}

/* With several queues, each must answer on its own ring: one read each, all
 * at once. The queues asked for are min(--queues, multi-queue-max-queues);
 * fewer serving is a problem (a backend that took only queue 0's nodes, or
 * answers on the wrong ring, is named). */
static bool check_queues(char *why, size_t cap)
{
	struct conninfo *ci = conn_now();
	ci->queues_serving = 1;
	if (C.nq < 2)
		return true;
	for (unsigned q = 0; q < C.nq; q++)
		put_request(q * depth, OP_READ, (rnd() % nblocks) * nsect_req);
	push(true);
	uint64_t end = now_ns() + (uint64_t)(O.connect_timeout * 1e9);
	unsigned serving = 0;
	for (;;) {
		reap(NULL);
		tick();
		serving = 0;
		for (unsigned q = 0; q < C.nq; q++)
			serving += !S[q * depth].busy;
		if (serving == C.nq || now_ns() >= end || stop_requested)
			break;
		wait_responses(50);
	}
	ci->queues_serving = serving;
	for (unsigned q = 0; q < C.nq; q++)
		S[q * depth].answered = false;
	if (serving == C.nq || stop_requested)
		return true;
	char which[80] = "";
	size_t n = 0;
	for (unsigned q = 0; q < C.nq && n < sizeof which - 8; q++)
		if (S[q * depth].busy)
			n += (size_t)snprintf(which + n, sizeof which - n, "%s%u", n ? "," : "", q);
	snprintf(why, cap,
		 "%u of the %u queues answered a read within %.0fs (expected min(%u asked, %u offered) = %u; no "
		 "response on queue %s)",
		 serving, C.nq, O.connect_timeout, O.queues, C.max_queues, C.nq, which);
	return false;
}

/* Which ring size the backend serves, on each queue, and that every queue serves. */
static bool probe_ring(char *why, size_t cap)
{
	for (unsigned q = 0; q < C.nq; q++)
		if (!probe_queue(q, why, cap))
			return false;
	return check_queues(why, cap);
}

/* Close, then Initialising: blkback logs "prepare for reconnect" and goes
 * back to InitWait; connect again with fresh pages and a fresh port and a
 * ring of page order `order` (the same code as the first connect), and
 * measure it. The idle --settle before the close lets the lab's dom0 sampler
 * see this connection's final statistics, the one after it their drop to 0:
 * it continues the series across the reconnect from exactly those
 * (lab/sampling.py rebase), so the drain's accounting still compares. */
static bool reopen(unsigned order, char *why, size_t cap);
static bool reconnect(unsigned order, char *why, size_t cap)
{
	settle();
	if (!conn_close(why, cap))
		return false;
	return reopen(order, why, cap);
}

/* After a close (both ends Closed, the connection freed): settle, Initialising,
 * InitWait, connect and measure. */
static bool reopen(unsigned order, char *why, size_t cap)
{
	settle();
	conn_begin(order);
	set_fe_state("reconnect", XB_INITIALISING);
	int st = wait_backend(BIT(XB_INITWAIT), O.connect_timeout);
	if (st != XB_INITWAIT) {
		snprintf(why, cap,
			 "backend did not prepare for reconnect: state %d %.0fs after the frontend wrote Initialising "
			 "(1), never InitWait (2)",
			 st, O.connect_timeout);
		return false;
	}
	return conn_open(false, why, cap) && probe_ring(why, cap);
}

/* ------------------------------------------------------------------ behaviours */
static bool ending; /* past the deadline: responses are not answered with new requests */

/* A response freed slot si: its next request at once, pushed (the aggressive
 * frontend's notify on every push with notify=always). Only si's queue can
 * hold requests not yet pushed: every request of this behaviour is pushed as
 * it is queued. */
static void requeue(unsigned si)
{
	if (ending || stop_requested) {
		freelist[nfree++] = si;
		return;
	}
	next_request(si);
	push_queue(queue_of(si), O.notify_always);
}

static void to_freelist(unsigned si)
{
	freelist[nfree++] = si;
}

/* The rest of a pass opened at t (pass_begin(): one clock read for every
 * stamp of the pass, its tick and the caller's deadline): the responses
 * waiting, `then` for each slot freed, the tick. Returns the responses. */
static unsigned reap_pass(void (*then)(unsigned si), uint64_t t)
{
	unsigned n = reap(then);
	tick_at(t);
	pass_end();
	return n;
}

/* After a pass: sleep unless more responses are already waiting (then the
 * next pass at once). A pass that reaped none always sleeps. This is what the
 * loops did with a pass more, without that pass's clock read: after a pass
 * that reaped some, an empty pass then the sleep (which asks for an event,
 * rsp_event, only when it finds nothing waiting, as before). */
static void wait_after(unsigned n)
{
	if (n && responses_waiting())
		return;
	wait_responses(50);
}

static void run_base(uint64_t end)
{
	ending = false;
	uint64_t t;
	if (O.behaviour == B_AGGRESSIVE) {
		/* fill the ring one request at a time, each pushed and notified */
		pass_begin();
		while (nfree && !stop_requested) {
			next_request(pop_free());
			push(O.notify_always);
		}
		pass_end();
		/* then each response answered by a request, pushed and notified
		 * (requeue()); the deadline is checked before each pass, so no
		 * request goes out after it */
		while (!stop_requested && (t = pass_begin()) < end) {
			unsigned n = reap_pass(requeue, t);
			if (!stop_requested)
				wait_after(n);
		}
		pass_end();
	} else {
		const uint64_t limit = end + (uint64_t)(O.drain_timeout * 1e9);
		while (!stop_requested && (t = pass_begin()) < end) {
			while (nfree)
				next_request(pop_free());
			pass_end();
			push(O.notify_always);
			while (C.inflight && !stop_requested) {
				t = pass_begin();
				unsigned n = reap_pass(to_freelist, t);
				if (t > limit)
					break;
				if (C.inflight && !stop_requested)
					wait_after(n);
			}
			if (O.burst_gap > 0) {
				uint64_t until = now_ns() + (uint64_t)(O.burst_gap * 1e9);
				while (now_ns() < until && !stop_requested) {
					tick();
					sleep_ms(20);
				}
			}
		}
		pass_end();
	}
	ending = true;
}

/* Wait for every request on the ring; false if some never came back. */
static bool drain(double seconds)
{
	ending = true;
	bool ok = wait_answered(-1, seconds, to_freelist);
	tick();
	return ok;
}

/* After a scheduled phase, drained: a connection that served none of its
 * phase's requests is a problem even if nothing hung. */
static void phase_done(double seconds)
{
	struct conninfo *ci = conn_now();
	if (ci->scheduled && !stop_requested && conn_done(ci) == phase_done0)
		conn_problem("completed no request in its %.1fs phase", seconds);
}

/* The behaviour in 1 + --reconnect-orders phases of equal length, each after
 * the first on a new connection with the next order: drain, settle, close,
 * settle, Initialising, InitWait, connect, probe (reconnect()). The
 * reconnect's time is no phase's: each gets duration / phases of I/O, and
 * idle_ns keeps it out of runtime_s. Returns false when the schedule stopped
 * on a problem (`*undrained`: requests were still out before a reconnect). */
static bool run_schedule(bool *undrained)
{
	unsigned phases = O.nreconnect + 1;
	double len = O.duration / phases;
	for (unsigned k = 0; k < phases && !stop_requested; k++) {
		if (k > 0) {
			if (!drain(O.drain_timeout)) {
				conn_problem("%u requests never completed within %.0fs before the reconnect to ring-page-order %u",
					     C.inflight, O.drain_timeout, O.reconnect_orders[k - 1]);
				*undrained = true;
				return false;
			}
			phase_done(len);
			uint64_t t0 = now_ns();
			char why[400];
			bool up = reconnect(O.reconnect_orders[k - 1], why, sizeof why);
			idle_ns += now_ns() - t0;
			if (!up) {
				conn_problem("%s", why);
				return false;
			}
		}
		conn_now()->scheduled = true;
		phase_done0 = conn_done(conn_now());
		run_base(now_ns() + (uint64_t)(len * 1e9));
	}
	return true;
}

/* ------------------------------------------------------------------ hostile cases */
static const char *status_name(int16_t st)
{
	switch (st) {
	case BLKIF_RSP_OKAY:
		return "okay";
	case BLKIF_RSP_ERROR:
		return "error";
	case BLKIF_RSP_EOPNOTSUPP:
		return "eopnotsupp";
	default:
		return "an unknown status";
	}
}

/* Whatever is on the rings is given up (a case that broke the ring, or a closed
 * connection's requests that never came back). */
static void forget_rings(void)
{
	for (unsigned q = 0; q < C.nq; q++) {
		C.q[q].req_prod_pvt = C.q[q].rsp_cons = 0;
		C.q[q].inflight = 0;
	}
	C.inflight = 0;
	for (unsigned i = 0; i < nslots; i++) {
		S[i].busy = false;
		S[i].extra = 0;
	}
}

/* after an error case: does the ring still serve a plain read? */
static bool still_serves(char *got, size_t cap)
{
	put_request(0, OP_READ, 0);
	push(true);
	if (!wait_answered(0, 5, NULL)) {
		snprintf(got, cap, "; then a plain read got no response within 5s");
		return false;
	}
	snprintf(got, cap, "; then a plain read got %s", status_name(S[0].status));
	return S[0].status == BLKIF_RSP_OKAY;
}

/* the ring serves again after a reconnect: `depth` reads, all okay */
static bool probe_reads(char *got, size_t cap)
{
	rebuild_freelist();
	while (nfree)
		put_request(pop_free(), OP_READ, (rnd() % nblocks) * nsect_req);
	push(true);
	uint64_t ok0 = ST.okay;
	bool all = wait_answered(-1, 10, to_freelist);
	unsigned okay = (unsigned)(ST.okay - ok0);
	snprintf(got, cap, "%u/%u reads okay after reconnect%s", okay, nslots, all ? "" : " (some never answered)");
	rebuild_freelist();
	return all && okay == nslots;
}

/* One malformed request on the idle ring, built by `build` into `r`. */
static void error_case(struct case_result *res, uint8_t op, void (*build)(union blkif_request *r))
{
	union blkif_request *r = req_next(0);
	memset(r, 0, sizeof *r);
	build(r);
	mark_submitted(0, op, 0, 0, K_MALFORMED);
	push(true);
	size_t n = 0;
	bool answered = wait_answered(0, 5, NULL);
	bool ok = answered && S[0].status == BLKIF_RSP_ERROR;
	if (answered)
		n = (size_t)snprintf(res->got, sizeof res->got, "%s response", status_name(S[0].status));
	else
		n = (size_t)snprintf(res->got, sizeof res->got, "no response within 5s");
	if (answered) {
		bool serves = still_serves(res->got + n, sizeof res->got - n);
		ok = ok && serves;
	}
	res->ok = ok;
}

static void build_too_many_segments(union blkif_request *r)
{
	/* 12 > BLKIF_MAX_SEGMENTS_PER_REQUEST: blkback refuses before reading seg[] */
	r->rw.operation = BLKIF_OP_READ;
	r->rw.nr_segments = BLKIF_MAX_SEGMENTS_PER_REQUEST + 1;
	r->rw.handle = (uint16_t)O.devid;
	r->rw.id = 0;
	r->rw.sector_number = 0;
	for (unsigned i = 0; i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++) {
		r->rw.seg[i].gref = slot_gref(0, 0);
		r->rw.seg[i].last_sect = SECTORS_PER_PAGE - 1;
	}
}

/* A grant reference beyond any grant table (Xen answers GNTST_bad_gntref). Not
 * a freed one of ours: the kernel reuses freed references at once (netfront),
 * and a read into someone else's page would corrupt it. A write, so that even a
 * backend that mapped it anyway would only write the test disk. */
#define BAD_GREF 0xfffffff0u
/* a one-page write of sector 0 from `gref`, with id 0 */
static void build_write_from(union blkif_request *r, grant_ref_t gref)
{
	r->rw.operation = BLKIF_OP_WRITE;
	r->rw.nr_segments = 1;
	r->rw.handle = (uint16_t)O.devid;
	r->rw.id = 0;
	r->rw.sector_number = 0;
	r->rw.seg[0].gref = gref;
	r->rw.seg[0].last_sect = SECTORS_PER_PAGE - 1;
}

static void build_bad_gref(union blkif_request *r)
{
	build_write_from(r, BAD_GREF);
}

/* revoked-grant-ref: a page granted to the backend and the grant ended (the
 * frontend took the page back) before a request naming its ref is pushed. */
static grant_ref_t revoked_ref;

static bool grant_one(grant_ref_t *ref, uint64_t *index)
{
	struct ioctl_gntalloc_alloc_gref a = { .domid = (uint16_t)C.backend_id, .flags = GNTALLOC_FLAG_WRITABLE,
					       .count = 1 };
	if (ioctl(C.gfd, IOCTL_GNTALLOC_ALLOC_GREF, &a) < 0)
		return false;
	*ref = a.gref_ids[0];
	*index = a.index;
	return true;
}

static bool end_grant(uint64_t index)
{
	struct ioctl_gntalloc_dealloc_gref d = { .index = index, .count = 1 };
	return ioctl(C.gfd, IOCTL_GNTALLOC_DEALLOC_GREF, &d) == 0;
}

static void case_revoked(struct case_result *res)
{
	uint64_t index;
	/* never mapped here nor by the backend: gntalloc ends the grant at once */
	if (!grant_one(&revoked_ref, &index) || !end_grant(index)) {
		snprintf(res->got, sizeof res->got, "could not grant and revoke a page: %s", strerror(errno));
		res->ok = false;
		return;
	}
	snprintf(res->expected, sizeof res->expected,
		 "error response to a write naming grant ref %u, revoked before it was pushed; then the ring still "
		 "serves",
		 revoked_ref);
	union blkif_request *r = req_next(0);
	memset(r, 0, sizeof *r);
	build_write_from(r, revoked_ref);
	/* counted as served only if it is (blkback counts sectors after mapping) */
	mark_submitted(0, OP_WRITE, 0, SECTORS_PER_PAGE, K_ORPHAN);
	push(true);
	bool answered = wait_answered(0, 5, NULL);
	size_t n = answered ? (size_t)snprintf(res->got, sizeof res->got, "%s response", status_name(S[0].status))
			    : (size_t)snprintf(res->got, sizeof res->got, "no response within 5s");
	bool ok = answered && S[0].status == BLKIF_RSP_ERROR;
	if (answered && S[0].status == BLKIF_RSP_OKAY) {
		/* The guest kernel hands freed refs out again last-in first-out: if a
		 * new grant does not get this ref, another grant (blkfront on another
		 * disk, say) took it meanwhile, and blkback rightly served a ref that
		 * was valid again. If it does get it, the ref stayed revoked. */
		grant_ref_t again;
		if (grant_one(&again, &index)) {
			end_grant(index);
			ok = again != revoked_ref;
			n += (size_t)snprintf(res->got + n, sizeof res->got - n,
					      ok ? " (the ref had been granted again meanwhile: a new grant got %u)"
						 : " to a ref still revoked (a new grant got it back: %u)",
					      again);
		}
	}
	if (answered) {
		bool serves = still_serves(res->got + n, sizeof res->got - n);
		ok = ok && serves;
	}
	res->ok = ok;
}

static uint64_t range_sector;
static void build_out_of_range(union blkif_request *r)
{
	r->rw.operation = BLKIF_OP_READ;
	r->rw.nr_segments = 1;
	r->rw.handle = (uint16_t)O.devid;
	r->rw.id = 0;
	r->rw.sector_number = range_sector;
	r->rw.seg[0].gref = slot_gref(0, 0);
	r->rw.seg[0].last_sect = SECTORS_PER_PAGE - 1;
}

static void case_prod_ahead(struct case_result *res)
{
	/* RING_REQUEST_PROD_OVERFLOW: req_prod more than a ring ahead of the
	 * responses. blkback warns "Frontend provided bogus ring requests" and
	 * stops serving the ring until it is disconnected. */
	struct queue *Q = &C.q[0];
	RING_IDX bogus = Q->req_prod_pvt + 2 * C.size;
	RING_IDX rsp0 = __atomic_load_n(&Q->sring->rsp_prod, __ATOMIC_ACQUIRE);
	__atomic_store_n(&Q->sring->req_prod, bogus, __ATOMIC_RELEASE);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	notify(0);
	uint64_t end = now_ns() + (uint64_t)(O.halt_wait * 1e9);
	while (now_ns() < end) {
		tick();
		sleep_ms(20);
	}
	RING_IDX rsp1 = __atomic_load_n(&Q->sring->rsp_prod, __ATOMIC_ACQUIRE);
	bool halted = rsp1 == rsp0;
	size_t n = (size_t)snprintf(res->got, sizeof res->got, "%s within %.1fs",
				    halted ? "no response" : "responses", O.halt_wait);
	if (!halted)
		n += (size_t)snprintf(res->got + n, sizeof res->got - n, " (%u of them)", (unsigned)(rsp1 - rsp0));
	/* the ring is garbage from here: forget it, reconnect */
	forget_rings();
	char why[400];
	if (!reconnect(cur_order, why, sizeof why)) {
		snprintf(res->got + n, sizeof res->got - n, "; close + reconnect failed: %.200s", why);
		res->ok = false;
		fatal("hostile", "prod-ahead: %s", why);
	}
	n += (size_t)snprintf(res->got + n, sizeof res->got - n, "; ");
	bool serves = probe_reads(res->got + n, sizeof res->got - n);
	res->ok = halted && serves;
}

static void case_kill(struct case_result *res)
{
	/* A full ring of reads goes out, then a child that holds the only other
	 * references to the pages, the grant file and the port is killed: the
	 * frontend dies with the requests outstanding. gntalloc revokes the
	 * grants the backend has not mapped, the port closes. The ring page
	 * stays mapped here, so what the backend still answers is collected
	 * (and counted as blkback counts it) before the close + reconnect. */
	unsigned pushed = 0;
	while (nfree) {
		unsigned si = pop_free();
		put_request(si, OP_READ, (rnd() % nblocks) * nsect_req);
		S[si].kind = K_ORPHAN;
		pushed++;
	}
	push(true);
	fflush(stdout);
	fflush(stderr);
	pid_t pid = fork();
	if (pid < 0)
		fatal("hostile", "fork: %s", strerror(errno));
	if (pid == 0) {
		for (;;)
			pause();
	}
	drop_all_but_ring();
	RING_IDX before = 0;
	for (unsigned q = 0; q < C.nq; q++)
		before += __atomic_load_n(&C.q[q].sring->rsp_prod, __ATOMIC_ACQUIRE) - C.q[q].rsp_cons;
	kill(pid, SIGKILL);
	int wst = 0;
	while (waitpid(pid, &wst, 0) < 0 && errno == EINTR)
		;
	bool killed = WIFSIGNALED(wst) && WTERMSIG(wst) == SIGKILL;
	uint64_t ok0 = ST.okay, err0 = ST.error;
	uint64_t end = now_ns() + 5000000000ull; /* no port any more: poll the ring */
	while (C.inflight && now_ns() < end) {
		reap(NULL);
		tick();
		sleep_ms(20);
	}
	size_t n = (size_t)snprintf(res->got, sizeof res->got,
				    "frontend %s with %u reads outstanding (%u answered before); the backend then answered "
				    "%u okay, %u error, %u not within 5s; ",
				    killed ? "killed" : "did not die by SIGKILL", pushed - (unsigned)before, (unsigned)before,
				    (unsigned)(ST.okay - ok0), (unsigned)(ST.error - err0), C.inflight);
	forget_rings();
	char why[400];
	if (!reconnect(cur_order, why, sizeof why)) {
		snprintf(res->got + n, sizeof res->got - n, "close + reconnect failed: %.200s", why);
		res->ok = false;
		fatal("hostile", "kill-with-outstanding: %s", why);
	}
	bool serves = probe_reads(res->got + n, sizeof res->got - n);
	res->ok = killed && serves;
}

static void case_slot_reuse(struct case_result *res)
{
	/* A frontend that reuses an id whose response has not come yet: a second
	 * request with slot 0's id goes in while the first is out. blkback keeps
	 * no table of ids, it echoes each, so a sound backend answers both and
	 * the ring serves on; this program counts the second response as the
	 * slot's second (struct slot's extra), not as one for no request. */
	uint64_t ok0 = ST.okay, err0 = ST.error, other0 = ST.eopnotsupp + ST.other_status;
	uint64_t bogus0 = ST.bogus_responses;
	uint64_t sector = (rnd() % nblocks) * nsect_req;
	put_request(0, OP_READ, sector);
	push(true);
	struct queue *Q = &C.q[0];
	bool early = __atomic_load_n(&Q->sring->rsp_prod, __ATOMIC_ACQUIRE) == Q->rsp_cons;
	put_request(0, OP_READ, sector);
	push(true);
	bool answered = wait_answered(0, 5, NULL);
	unsigned okay = (unsigned)(ST.okay - ok0), error = (unsigned)(ST.error - err0);
	unsigned other = (unsigned)(ST.eopnotsupp + ST.other_status - other0);
	unsigned bogus = (unsigned)(ST.bogus_responses - bogus0);
	size_t n = (size_t)snprintf(res->got, sizeof res->got,
				    "the second request with id 0 went in %s; responses with that id: %u okay, %u error, "
				    "%u other%s",
				    early ? "while the first was outstanding" : "after the first was answered (not early)",
				    okay, error, other, answered ? "" : ", not both within 5s");
	if (bogus)
		n += (size_t)snprintf(res->got + n, sizeof res->got - n, "; %u for no request", bogus);
	bool ok = answered && okay == 2 && error == 0 && other == 0 && bogus == 0;
	if (answered) {
		bool serves = still_serves(res->got + n, sizeof res->got - n);
		ok = ok && serves;
	}
	res->ok = ok;
}

/* the backend's state, waited for while collecting responses */
static int wait_backend_reaping(unsigned want, double seconds)
{
	uint64_t end = now_ns() + (uint64_t)(seconds * 1e9);
	for (;;) {
		reap(NULL);
		tick();
		int st = be_state();
		if (want & BIT(st))
			return st;
		if (now_ns() >= end)
			return st;
		sleep_ms(10);
	}
}

/* Returns false when the device can no longer be used (lost_why says why). */
static bool case_mid_flight(struct case_result *res)
{
	/* A full ring of reads against a slow backing device, then Closing and
	 * Closed while they are out. blkback keeps serving in Closing; at Closed
	 * xen_blkif_disconnect() stops the ring's thread and, with requests in
	 * flight, takes its busy path (-EBUSY: the ring stays mapped, the
	 * event channel bound) and switches to Closed anyway; what was in flight
	 * completes later onto the old ring; the next connect finishes the
	 * disconnect. Expected: Closed within --close-timeout, the responses
	 * collected, and a reconnect that serves. */
	unsigned pushed = 0;
	while (nfree) {
		put_request(pop_free(), OP_READ, (rnd() % nblocks) * nsect_req);
		pushed++;
	}
	push(true);
	/* the backend took every request once req_event is past them
	 * (RING_FINAL_CHECK_FOR_REQUESTS): only then can none be dropped unseen */
	uint64_t end = now_ns() + 2000000000ull;
	bool taken = false;
	while (!taken && now_ns() < end) {
		taken = true;
		for (unsigned q = 0; q < C.nq; q++)
			taken = taken && __atomic_load_n(&C.q[q].sring->req_event, __ATOMIC_ACQUIRE) ==
						 C.q[q].req_prod_pvt + 1;
		if (!taken)
			sleep_ms(1);
	}
	uint64_t ok0 = ST.okay, err0 = ST.error;
	unsigned at_closing = C.inflight;
	set_fe_state("hostile", XB_CLOSING);
	int st = wait_backend_reaping(BIT(XB_CLOSING) | BIT(XB_CLOSED), O.close_timeout);
	size_t n = (size_t)snprintf(res->got, sizeof res->got,
				    "%u reads pushed (%s), %u outstanding at Closing; ", pushed,
				    taken ? "all taken" : "not all taken within 2s", at_closing);
	if (st != XB_CLOSING && st != XB_CLOSED) {
		snprintf(res->got + n, sizeof res->got - n, "the backend stayed in state %d %.0fs after Closing (5)", st,
			 O.close_timeout);
		res->ok = false;
		lost_why = "not closed: the backend did not follow Closing";
		forget_rings();
		conn_free();
		return false;
	}
	unsigned at_closed = C.inflight;
	uint64_t t_closed = now_ns();
	set_fe_state("hostile", XB_CLOSED);
	st = wait_backend_reaping(BIT(XB_CLOSED), O.close_timeout);
	double took = (double)(now_ns() - t_closed) / 1e9;
	if (st != XB_CLOSED) {
		snprintf(res->got + n, sizeof res->got - n,
			 "the backend stayed in state %d%s %.1fs after the frontend wrote Closed (6) with %u reads in "
			 "flight (%u still unanswered)",
			 st, st == XB_CLOSING ? " (Closing)" : "", took, at_closed, C.inflight);
		res->ok = false;
		lost_why = "not closed: the backend stayed in Closing";
		forget_rings();
		conn_free();
		return false;
	}
	/* what still lands on the old ring (no port may be bound any more: poll) */
	end = now_ns() + 5000000000ull;
	while (C.inflight && now_ns() < end) {
		reap(NULL);
		tick();
		sleep_ms(10);
	}
	n += (size_t)snprintf(res->got + n, sizeof res->got - n,
			      "%u at Closed; the backend Closed after %.2fs; responses since Closing: %u okay, %u error, "
			      "%u never within 5s; ",
			      at_closed, took, (unsigned)(ST.okay - ok0), (unsigned)(ST.error - err0), C.inflight);
	forget_rings();
	conn_free();
	char why[400];
	if (!reopen(cur_order, why, sizeof why)) {
		snprintf(res->got + n, sizeof res->got - n, "the reconnect failed: %.200s", why);
		res->ok = false;
		lost_why = "closed: the reconnect after reconnect-mid-flight failed";
		return false;
	}
	res->ok = probe_reads(res->got + n, sizeof res->got - n);
	return true;
}

/* Returns false when a case left no device to go on with. */
static bool run_hostile(void)
{
	for (unsigned k = 0; k < O.nhostile && !stop_requested; k++) {
		int c = O.hostile[k];
		struct case_result *res = &results[nresults++];
		res->name = CASES[c];
		if (!drain(10))
			fatal("hostile", "the ring did not go idle before case %s", CASES[c]);
		rebuild_freelist();
		switch (c) {
		case H_SEGMENTS:
			snprintf(res->expected, sizeof res->expected,
				 "error response to nr_segments=%u; then the ring still serves",
				 BLKIF_MAX_SEGMENTS_PER_REQUEST + 1);
			error_case(res, OP_READ, build_too_many_segments);
			break;
		case H_GREF:
			snprintf(res->expected, sizeof res->expected,
				 "error response to grant ref 0x%x; then the ring still serves", BAD_GREF);
			error_case(res, OP_WRITE, build_bad_gref);
			break;
		case H_RANGE: {
			snprintf(res->expected, sizeof res->expected,
				 "error responses to a read past the end (sector %" PRIu64
				 ") and one across it; then the ring still serves",
				 C.sectors);
			struct case_result past = { 0 }, across = { 0 };
			range_sector = C.sectors;
			error_case(&past, OP_READ, build_out_of_range);
			range_sector = C.sectors - SECTORS_PER_PAGE / 2;
			error_case(&across, OP_READ, build_out_of_range);
			snprintf(res->got, sizeof res->got, "past the end: %.100s; across it: %.100s", past.got,
				 across.got);
			res->ok = past.ok && across.ok;
			break;
		}
		case H_PROD:
			snprintf(res->expected, sizeof res->expected,
				 "no response (ring halted) for %.1fs after req_prod ran %u ahead; close + reconnect "
				 "serves again",
				 O.halt_wait, 2 * C.size);
			case_prod_ahead(res);
			break;
		case H_KILL:
			snprintf(res->expected, sizeof res->expected,
				 "the backend survives a frontend killed with a full ring outstanding; close + "
				 "reconnect serves again");
			case_kill(res);
			break;
		case H_REUSE:
			snprintf(res->expected, sizeof res->expected,
				 "both requests with one id answered (two okay responses with that id); then the ring "
				 "still serves");
			case_slot_reuse(res);
			break;
		case H_REVOKED:
			case_revoked(res);
			break;
		case H_MIDFLIGHT:
			snprintf(res->expected, sizeof res->expected,
				 "Closing then Closed with a full ring of reads in flight: the backend Closed within %.0fs; "
				 "Initialising + reconnect serves again",
				 O.close_timeout);
			case_mid_flight(res);
			break;
		}
		if (!res->ok)
			problem("hostile case %s: expected %s; got %s", res->name, res->expected, res->got);
		if (lost_why)
			return false;
		rebuild_freelist();
	}
	return true;
}

/* ------------------------------------------------------------------ output */
static void jstr(FILE *f, const char *s)
{
	fputc('"', f);
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			fprintf(f, "\\%c", c);
		else if (c < 0x20)
			fprintf(f, "\\u%04x", c);
		else
			fputc(c, f);
	}
	fputc('"', f);
}

static double secs(uint64_t a, uint64_t b)
{
	return b > a ? (double)(b - a) / 1e9 : 0.0;
}

static uint64_t failed_cases(void)
{
	uint64_t n = 0;
	for (unsigned i = 0; i < nresults; i++)
		n += !results[i].ok;
	return n;
}

static unsigned failed_connections(void)
{
	unsigned n = 0;
	for (unsigned i = 0; i < nconns; i++)
		n += conns[i].problem[0] != 0;
	return n;
}

static void emit_json(const char *fatal_stage, const char *fatal_msg)
{
	static bool emitted;
	if (emitted)
		return;
	emitted = true;
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);
	if (!f)
		return;
	uint64_t t_end = t_io_end ? t_io_end : now_ns();
	double runtime = secs(t_base0 ? t_base0 : t_io0, t_end) - (double)idle_ns / 1e9;
	if (runtime < 0)
		runtime = 0;
	fprintf(f, "{\"tool\":\"blkring\",\"version\":%d,\"devid\":%u,", VERSION, O.devid);
	fprintf(f, "\"behaviour\":\"%s\",\"op\":\"%s\",\"rwmixread\":%u,\"notify\":\"%s\",\"poll\":%s,",
		BEHAVIOURS[O.behaviour], OPS[O.op], O.rwmixread, O.notify_always ? "always" : "needed",
		O.busy_poll ? "true" : "false");
	fprintf(f, "\"duration_s\":%.3f,\"runtime_s\":%.3f,\"elapsed_s\":%.3f,", O.duration, t_io0 ? runtime : 0.0,
		secs(t_start, now_ns()));
	fprintf(f,
		"\"ring\":{\"pages\":%u,\"requested_pages\":%u,\"entries\":%u,\"depth\":%u,\"segments\":%u,"
		"\"indirect\":%s,\"persistent\":%s,\"backend_persistent\":%s,\"backend_max_ring_page_order\":%u,"
		"\"backend_max_indirect_segments\":%u,\"protocol\":\"x86_64-abi\",\"sectors\":%" PRIu64
		",\"sector_size\":%u,\"flush\":%s,\"discard\":%s,",
		C.pages, 1u << cur_order, C.size, depth, O.segments, C.ipp ? "true" : "false",
		O.persistent ? "true" : "false", C.be_persistent ? "true" : "false", C.max_order, C.max_indirect,
		C.sectors, C.sector_size, C.flush ? "true" : "false", C.discard ? "true" : "false");
	/* queues: the last connection's; per_queue: each queue's requests and
	 * responses over the run */
	unsigned nq_seen = C.nq ? C.nq : 1;
	for (unsigned q = C.nq; q < MAX_QUEUES; q++)
		if (q_requests[q])
			nq_seen = q + 1;
	fprintf(f, "\"queues\":%u,\"requested_queues\":%u,\"backend_max_queues\":%u,\"per_queue\":[", C.nq,
		O.queues, C.max_queues);
	for (unsigned q = 0; q < nq_seen; q++)
		fprintf(f, "%s{\"queue\":%u,\"requests\":%" PRIu64 ",\"completed\":%" PRIu64 "}", q ? "," : "", q,
			q_requests[q], q_completed[q]);
	fprintf(f, "]},");
	fprintf(f, "\"connections\":%u,\"requests\":%" PRIu64 ",", C.number, ST.requests);
	fprintf(f, "\"reconnect_orders\":[");
	for (unsigned i = 0; i < O.nreconnect; i++)
		fprintf(f, "%s%u", i ? "," : "", O.reconnect_orders[i]);
	fprintf(f, "],\"reconnect_idle_s\":%.3f,\"connections_detail\":[", (double)idle_ns / 1e9);
	for (unsigned i = 0; i < nconns; i++) {
		const struct conninfo *ci = &conns[i];
		fprintf(f,
			"%s{\"index\":%u,\"requested_order\":%u,\"backend_max_ring_page_order\":%u,"
			"\"allowed_pages\":%u,\"pages\":%u,\"entries\":%u,\"depth\":%u,\"queues\":%u,"
			"\"queues_serving\":%u,\"connected\":%s,"
			"\"scheduled\":%s,\"requests\":%" PRIu64 ",\"responses\":{\"okay\":%" PRIu64
			",\"error\":%" PRIu64 ",\"other\":%" PRIu64 "},\"problem\":",
			i ? "," : "", i + 1, ci->requested_order, ci->max_order, ci->allowed_pages, ci->pages, ci->entries,
			ci->depth, ci->queues, ci->queues_serving, ci->connected ? "true" : "false", ci->scheduled ? "true" : "false", ci->requests, ci->okay,
			ci->error, ci->other);
		if (ci->problem[0])
			jstr(f, ci->problem);
		else
			fputs("null", f);
		fprintf(f, ",\"ok\":%s}", ci->problem[0] ? "false" : "true");
	}
	fprintf(f, "],");
	fprintf(f,
		"\"responses\":{\"okay\":%" PRIu64 ",\"error\":%" PRIu64 ",\"eopnotsupp\":%" PRIu64
		",\"other\":%" PRIu64 "},",
		ST.okay, ST.error, ST.eopnotsupp, ST.other_status);
	fprintf(f,
		"\"completed\":{\"read\":%" PRIu64 ",\"write\":%" PRIu64 ",\"flush\":%" PRIu64 ",\"discard\":%" PRIu64
		"},",
		ST.completed_by_op[OP_READ], ST.completed_by_op[OP_WRITE], ST.completed_by_op[OP_FLUSH],
		ST.completed_by_op[OP_DISCARD]);
	fprintf(f, "\"bytes\":{\"read\":%" PRIu64 ",\"written\":%" PRIu64 "},", ST.bytes_read, ST.bytes_written);
	fprintf(f, "\"latency_ms\":{\"p50\":%.3f,\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f,\"mean\":%.3f,\"n\":%" PRIu64 "},",
		percentile_ms(0.50), percentile_ms(0.99), percentile_ms(0.999), (double)ST.lat_max_us / 1000.0,
		ST.lat_n ? (double)ST.lat_sum_us / (double)ST.lat_n / 1000.0 : 0.0, ST.lat_n);
	fprintf(f, "\"notifies\":%" PRIu64 ",\"events\":%" PRIu64 ",", ST.notifies, ST.events);
	fprintf(f, "\"series\":{\"interval_s\":1,\"completions\":[");
	for (size_t i = 0; i < ST.series_len; i++)
		fprintf(f, "%s%" PRIu64, i ? "," : "", ST.series_done[i]);
	fprintf(f, "],\"inflight_max\":[");
	for (size_t i = 0; i < ST.series_len; i++)
		fprintf(f, "%s%u", i ? "," : "", ST.series_inflight[i]);
	fprintf(f, "]},");
	fprintf(f, "\"verify\":{\"enabled\":%s,\"checked\":%" PRIu64 ",\"mismatches\":%" PRIu64 ",\"first_mismatch_sector\":",
		O.verify ? "true" : "false", ST.verify_checked, ST.verify_mismatches);
	if (ST.verify_mismatches)
		fprintf(f, "%" PRIu64 "},", ST.first_mismatch_sector);
	else
		fprintf(f, "null},");
	fprintf(f, "\"hostile\":[");
	for (unsigned i = 0; i < nresults; i++) {
		fprintf(f, "%s{\"case\":", i ? "," : "");
		jstr(f, results[i].name);
		fprintf(f, ",\"expected\":");
		jstr(f, results[i].expected);
		fprintf(f, ",\"got\":");
		jstr(f, results[i].got);
		fprintf(f, ",\"ok\":%s}", results[i].ok ? "true" : "false");
	}
	fprintf(f, "],");
	fprintf(f,
		"\"unexpected_errors\":%" PRIu64 ",\"bogus_responses\":%" PRIu64 ",\"never_completed\":%" PRIu64
		",\"failed_cases\":%" PRIu64 ",\"failed_connections\":%u,",
		ST.unexpected_errors, ST.bogus_responses, ST.never_completed, failed_cases(), failed_connections());
	fprintf(f, "\"stopped_by_signal\":%s,\"closed\":", stop_requested ? "true" : "false");
	jstr(f, closed_how);
	fprintf(f, ",\"errors\":[");
	for (unsigned i = 0; i < nproblems; i++) {
		if (i)
			fputc(',', f);
		jstr(f, problems[i]);
	}
	fprintf(f, "],");
	if (fatal_stage) {
		fprintf(f, "\"fatal\":{\"stage\":");
		jstr(f, fatal_stage);
		fprintf(f, ",\"message\":");
		jstr(f, fatal_msg);
		fprintf(f, "},");
	}
	fprintf(f, "\"ok\":%s}\n", !fatal_stage && !nproblems ? "true" : "false");
	fclose(f);
	if (O.output[0]) {
		char tmp[300];
		snprintf(tmp, sizeof tmp, "%s.tmp", O.output);
		FILE *o = fopen(tmp, "w");
		if (o && fwrite(buf, 1, len, o) == len && fclose(o) == 0)
			rename(tmp, O.output);
		else
			fprintf(stderr, "blkring: cannot write %s: %s\n", O.output, strerror(errno));
	} else {
		fwrite(buf, 1, len, stdout);
		fflush(stdout);
	}
	free(buf);
}

/* ------------------------------------------------------------------ the end of the run */
/* Stay connected after the run and close when the toolstack detaches the disk
 * (the backend goes to Closing): blkback's statistics live as long as the
 * ring, and the lab compares them with ours after the workload has ended. A
 * session of its own, no terminal, stdio on /dev/null: the lab's SSH command
 * ends with the parent. */
static void linger(void)
{
	fflush(stdout);
	fflush(stderr);
	pid_t pid = fork();
	if (pid != 0)
		return; /* the parent (or a failed fork: the ring simply stays) */
	setsid();
	int fd = open("/dev/null", O_RDWR);
	if (fd >= 0) {
		dup2(fd, 0);
		dup2(fd, 1);
		dup2(fd, 2);
		if (fd > 2)
			close(fd);
	}
	uint64_t end = now_ns() + (uint64_t)(O.linger_max * 1e9);
	for (;;) {
		int st = be_state();
		if (st == XB_UNKNOWN) /* the device is gone (a forced detach, the guest going) */
			_exit(0);
		if (st == XB_CLOSING || st == XB_CLOSED || now_ns() >= end || stop_requested)
			break;
		sleep_ms(200);
	}
	char why[160];
	conn_close(why, sizeof why);
	_exit(0);
}

/* ------------------------------------------------------------------ options */
static void usage(FILE *f)
{
	fprintf(f,
		"usage: blkring --devid N [--duration S] [--behaviour aggressive|bursty]\n"
		"               [--op read|write|flush|discard|mixed] [--rwmixread PCT] [--segments N]\n"
		"               [--depth N] [--ring-page-order N] [--queues N] [--persistent 0|1]\n"
		"               [--notify always|needed]\n"
		"               [--poll 0|1] [--verify 0|1] [--hostile CASE,...] [--halt-wait S]\n"
		"               [--burst-gap S] [--settle S] [--size BYTES] [--seed N] [--stat FILE]\n"
		"               [--at-end close|linger] [--linger-max S] [--connect-timeout S]\n"
		"               [--drain-timeout S] [--close-timeout S] [--reconnect-orders N,...]\n"
		"               [--output FILE]\n"
		"       blkring --job FILE [--output FILE]   (the same keys, one key=value a line)\n"
		"hostile cases: too-many-segments, bad-grant-ref, out-of-range-sector, prod-ahead,\n"
		"               kill-with-outstanding, slot-reuse, reconnect-mid-flight\n"
		"queues: 1..%d rings, as many as the backend's multi-queue-max-queues allows\n"
		"reconnect orders: up to %d ring page orders 0..4; the duration is split into one\n"
		"               phase more, each later one on a new connection with the next order\n",
		MAX_QUEUES, MAX_RECONNECTS);
}

static int pick(const char *key, const char *v, const char *const *names, int n)
{
	for (int i = 0; i < n; i++)
		if (strcmp(v, names[i]) == 0)
			return i;
	fatal("usage", "%s: unknown value '%s'", key, v);
}

static uint64_t num(const char *key, const char *v, uint64_t max)
{
	char *end;
	errno = 0;
	unsigned long long n = strtoull(v, &end, 0);
	if (errno || end == v || *end || v[0] == '-' || n > max)
		fatal("usage", "%s: expected a whole number up to %" PRIu64 ", got '%s'", key, max, v);
	return n;
}

static double seconds(const char *key, const char *v)
{
	char *end;
	errno = 0;
	double d = strtod(v, &end);
	if (errno || end == v || *end || !(d >= 0) || d > 7 * 24 * 3600.0)
		fatal("usage", "%s: expected seconds (0 .. 604800), got '%s'", key, v);
	return d;
}

static bool flag(const char *key, const char *v)
{
	if (!strcmp(v, "1") || !strcmp(v, "true") || !strcmp(v, "yes"))
		return true;
	if (!strcmp(v, "0") || !strcmp(v, "false") || !strcmp(v, "no"))
		return false;
	fatal("usage", "%s: expected 0 or 1, got '%s'", key, v);
}

static void set_path(char *dst, size_t cap, const char *key, const char *v)
{
	if (strlen(v) >= cap)
		fatal("usage", "%s: path longer than %zu characters", key, cap - 1);
	strcpy(dst, v);
}

static void set_option(const char *key, const char *v)
{
	/* keys may be written with - or _ */
	char k[64];
	size_t i;
	for (i = 0; key[i] && i < sizeof k - 1; i++)
		k[i] = key[i] == '-' ? '_' : key[i];
	k[i] = 0;
	if (!strcmp(k, "devid")) {
		O.devid = (unsigned)num(k, v, UINT32_MAX);
		O.have_devid = true;
	} else if (!strcmp(k, "duration"))
		O.duration = seconds(k, v);
	else if (!strcmp(k, "behaviour") || !strcmp(k, "behavior"))
		O.behaviour = pick(k, v, BEHAVIOURS, 2);
	else if (!strcmp(k, "op"))
		O.op = pick(k, v, OPS, 5);
	else if (!strcmp(k, "rwmixread"))
		O.rwmixread = (unsigned)num(k, v, 100);
	else if (!strcmp(k, "segments"))
		O.segments = (unsigned)num(k, v, SEGS_PER_INDIRECT_FRAME * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
	else if (!strcmp(k, "depth"))
		O.depth = (unsigned)num(k, v, 4096);
	else if (!strcmp(k, "ring_page_order"))
		O.ring_order = (unsigned)num(k, v, 4);
	else if (!strcmp(k, "queues")) {
		O.queues = (unsigned)num(k, v, MAX_QUEUES);
		if (O.queues < 1)
			fatal("usage", "queues: expected 1..%d, got '%s'", MAX_QUEUES, v);
	}
	else if (!strcmp(k, "persistent"))
		O.persistent = flag(k, v);
	else if (!strcmp(k, "notify"))
		O.notify_always = pick(k, v, (const char *const[]){ "needed", "always" }, 2) == 1;
	else if (!strcmp(k, "poll"))
		O.busy_poll = flag(k, v);
	else if (!strcmp(k, "verify"))
		O.verify = flag(k, v);
	else if (!strcmp(k, "hostile")) {
		char buf[256];
		set_path(buf, sizeof buf, k, v);
		O.nhostile = 0;
		for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
			int c = pick(k, t, CASES, H_COUNT);
			for (unsigned j = 0; j < O.nhostile; j++)
				if (O.hostile[j] == c)
					fatal("usage", "hostile: case '%s' given twice", t);
			O.hostile[O.nhostile++] = c;
		}
	} else if (!strcmp(k, "reconnect_orders")) {
		char buf[256];
		set_path(buf, sizeof buf, k, v);
		O.nreconnect = 0;
		for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
			if (O.nreconnect == MAX_RECONNECTS)
				fatal("usage", "reconnect_orders: at most %d orders, got more in '%s'", MAX_RECONNECTS, v);
			O.reconnect_orders[O.nreconnect++] = (unsigned)num(k, t, 4);
		}
	} else if (!strcmp(k, "halt_wait"))
		O.halt_wait = seconds(k, v);
	else if (!strcmp(k, "burst_gap"))
		O.burst_gap = seconds(k, v);
	else if (!strcmp(k, "settle"))
		O.settle = seconds(k, v);
	else if (!strcmp(k, "connect_timeout"))
		O.connect_timeout = seconds(k, v);
	else if (!strcmp(k, "drain_timeout"))
		O.drain_timeout = seconds(k, v);
	else if (!strcmp(k, "close_timeout"))
		O.close_timeout = seconds(k, v);
	else if (!strcmp(k, "linger_max"))
		O.linger_max = seconds(k, v);
	else if (!strcmp(k, "size"))
		O.size_bytes = num(k, v, UINT64_MAX);
	else if (!strcmp(k, "seed"))
		O.seed = num(k, v, UINT64_MAX);
	else if (!strcmp(k, "stat"))
		set_path(O.stat, sizeof O.stat, k, v);
	else if (!strcmp(k, "output"))
		set_path(O.output, sizeof O.output, k, v);
	else if (!strcmp(k, "at_end"))
		O.at_end = pick(k, v, AT_END, 2);
	else
		fatal("usage", "unknown option '%s'", key);
}

static void read_job(const char *path)
{
	FILE *f = fopen(path, "r");
	if (!f)
		fatal("usage", "job file %s: %s", path, strerror(errno));
	char line[512];
	unsigned n = 0;
	while (fgets(line, sizeof line, f)) {
		n++;
		line[strcspn(line, "\r\n")] = 0;
		char *s = line;
		while (*s == ' ' || *s == '\t')
			s++;
		if (!*s || *s == '#' || *s == '[')
			continue;
		char *eq = strchr(s, '=');
		if (!eq)
			fatal("usage", "job file %s line %u: expected key=value", path, n);
		*eq = 0;
		set_option(s, eq + 1);
	}
	fclose(f);
}

static void parse_args(int argc, char **argv)
{
	/* the output path first, so that an error in anything else is reported there */
	for (int i = 1; i < argc; i++) {
		if (!strncmp(argv[i], "--output=", 9))
			set_path(O.output, sizeof O.output, "output", argv[i] + 9);
		else if (!strcmp(argv[i], "--output") && i + 1 < argc)
			set_path(O.output, sizeof O.output, "output", argv[i + 1]);
	}
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
			usage(stdout);
			exit(0);
		}
		if (strncmp(a, "--", 2))
			fatal("usage", "unexpected argument '%s'", a);
		char key[64];
		const char *val;
		const char *eq = strchr(a, '=');
		if (eq) {
			snprintf(key, sizeof key, "%.*s", (int)(eq - a - 2), a + 2);
			val = eq + 1;
		} else {
			if (i + 1 >= argc)
				fatal("usage", "%s needs a value", a);
			snprintf(key, sizeof key, "%s", a + 2);
			val = argv[++i];
		}
		if (!strcmp(key, "job"))
			read_job(val);
		else
			set_option(key, val);
	}
	if (!O.have_devid)
		fatal("usage", "no --devid (the vbd's xenstore device id, e.g. 51728 for xvdb)");
	if (O.segments < 1)
		fatal("usage", "segments: at least 1");
	if (O.verify && O.op != OP_WRITE)
		fatal("usage", "verify writes a pattern and reads it back: it needs op=write");
	if (O.duration <= 0 && !O.nhostile)
		fatal("usage", "duration: more than 0 seconds");
	if (O.duration <= 0 && O.nreconnect)
		fatal("usage", "reconnect_orders splits the duration into phases: it needs more than 0 seconds");
}

static void on_signal(int sig)
{
	(void)sig;
	stop_requested = 1;
}

int main(int argc, char **argv)
{
	t_start = now_ns();
	signal(SIGPIPE, SIG_IGN);
	struct sigaction sa = { .sa_handler = on_signal }; /* no SA_RESTART: poll() returns */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	parse_args(argc, argv);
	rng_state = O.seed ? O.seed : (now_ns() ^ ((uint64_t)getpid() << 32)) | 1;
	nonce = rnd();
	snprintf(fedir, sizeof fedir, "device/vbd/%u", O.devid);

	if ((xs_fd = open("/dev/xen/xenbus", O_RDWR | O_CLOEXEC)) < 0)
		fatal("setup", "/dev/xen/xenbus: %s", strerror(errno));
	char why[400] = "";
	conn_begin(O.ring_order);
	if (!conn_open(true, why, sizeof why))
		fatal("connect", "%s", why);
	nsect_req = O.segments * SECTORS_PER_PAGE;
	span_sectors = C.sectors;
	if (O.size_bytes && O.size_bytes / SECTOR < span_sectors)
		span_sectors = O.size_bytes / SECTOR;
	nblocks = span_sectors / nsect_req;
	if (nblocks < (O.verify ? 2 * (uint64_t)slot_cap : 1))
		fatal("connect", "the disk (%" PRIu64 " sectors used) holds %" PRIu64 " requests of %u sectors: too few",
		      span_sectors, nblocks, nsect_req);
	if (O.op == OP_DISCARD && !C.discard)
		fatal("connect", "op=discard, but the backend offers no feature-discard");
	if (O.op == OP_FLUSH && !C.flush)
		fatal("connect", "op=flush, but the backend offers no feature-flush-cache");

	t_io0 = now_ns();
	next_stat = t_io0;
	series_index(t_io0);
	tick();
	/* up: the connection serves a ring of the size granted; false once a
	 * connection failed (the run then stops: there is no ring to go on with) */
	bool up = probe_ring(why, sizeof why), undrained = false;
	if (!up)
		conn_problem("%s", why);
	if (up && O.nhostile && !run_hostile()) {
		up = false; /* a case left no device to go on with (its problem says why) */
	} else if (up && O.nhostile) {
		/* a fresh connection for the rest: blkback's per-ring statistics then
		 * count only well-formed requests, which the lab compares with ours */
		if (!drain(10) || !reconnect(cur_order, why, sizeof why))
			fatal("hostile", "could not reconnect after the hostile cases: %s",
			      C.inflight ? "requests outstanding" : why);
	}
	t_base0 = now_ns();
	if (up && O.duration > 0)
		up = run_schedule(&undrained);
	/* requests still out when the schedule stopped were waited for already;
	 * a reconnect that failed after the close left no ring to drain */
	bool drained = !C.live || drain(undrained ? 0 : O.drain_timeout);
	t_io_end = now_ns();
	tick();
	if (!drained) {
		ST.never_completed = C.inflight;
		if (!undrained)
			problem("%u requests never completed within %.0fs after the run", C.inflight, O.drain_timeout);
	} else if (up) {
		phase_done(O.duration / (O.nreconnect + 1));
	}
	if (ST.unexpected_errors)
		problem("%" PRIu64 " error responses to well-formed requests", ST.unexpected_errors);
	if (ST.verify_mismatches)
		problem("verify: %" PRIu64 " of %" PRIu64 " blocks read back differ from what was written (first at "
			"sector %" PRIu64 ")",
			ST.verify_mismatches, ST.verify_checked, ST.first_mismatch_sector);
	if (ST.bogus_responses)
		problem("%" PRIu64 " responses for no outstanding request", ST.bogus_responses);
	write_stat();

	bool lingering = false;
	if (!drained) {
		closed_how = "not closed: requests outstanding";
	} else if (!C.live) {
		closed_how = lost_why ? lost_why : "closed: a reconnect failed";
	} else if (up && O.at_end == END_LINGER) {
		closed_how = "linger";
		lingering = true;
	} else {
		/* a refused connect leaves the backend in Closing: Closing and
		 * Closed from here take both ends to Closed, ready for a detach */
		closed_how = conn_close(why, sizeof why) ? (up ? "close" : "closed after a failed connection")
							 : "close failed";
		if (!strcmp(closed_how, "close failed"))
			problem("close: %s", why);
	}
	emit_json(NULL, NULL);
	for (unsigned i = 0; i < nproblems; i++)
		fprintf(stderr, "blkring: %s\n", problems[i]);
	if (lingering)
		linger();
	return nproblems ? 1 : 0;
}
