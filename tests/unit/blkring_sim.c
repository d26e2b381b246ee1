/*
 * blkring_sim: a stand-in for Xen under blkring, for the unit tier only
 * (tests/unit/test_ringfront.py). LD_PRELOADed into a dynamically linked
 * build of images/blkring/blkring.c, it fakes the three devices and plays a
 * backend after Linux's xen-blkback, so the frontend's ring arithmetic,
 * connect/close/reconnect, verify and hostile cases run without a VM:
 *
 *   /dev/xen/xenbus    an in-memory xenstore; a frontend state write is
 *                      answered the way blkback's frontend_changed() does
 *   /dev/xen/gntalloc  anonymous shared pages; grant refs index them; closing
 *                      the file revokes them
 *   /dev/xen/evtchn    an eventfd the backend signals (so poll() works)
 *
 * The backend thread serves the ring from a 32 MiB in-memory disk: the
 * checks blkback makes (segments, grant refs, sector range, a req_prod more
 * than a ring ahead halts the ring), its per-ring statistics (written to
 * $SIM_STATS after each batch, reset at each connect). Its connect reads the
 * ring as blkback's connect_ring() does (ring-page-order, absent = 0, then
 * ring-refN or ring-ref; a failure is xenbus_dev_fatal(): an error node and
 * Closing), and Initialising after Closed takes it back to InitWait ("prepare
 * for reconnect"). Broken backends, by environment:
 *
 *   SIM_CORRUPT=1        every 50th read returns a flipped byte (verify must see it)
 *   SIM_STALE_RING=1     a reconnect keeps the first connection's ring size and
 *                        maps only the first page the frontend gave, whatever
 *                        it asked for (ring state that survived the close)
 *   SIM_REFUSE_CONNECT=N the Nth connect fails, as a ring it cannot map would
 *   SIM_NO_PREPARE=1     Initialising after Closed is ignored (no InitWait)
 *   SIM_STUCK_CLOSING=1  a Closed written with requests in flight leaves the
 *                        backend in Closing for good (its disconnect never ends)
 *   SIM_ONE_QUEUE=1      only queue 0 of several is mapped and served
 *
 * And by environment, not broken: SIM_DELAY_MS=N answers each request N ms
 * after taking it (dm-delay's slow disk: requests stay in flight);
 * SIM_MAX_QUEUES=N offers N queues (multi-queue-max-queues; default 4, 0 = no
 * node, an old backend). Several queues are read as blkback's connect_ring()
 * reads them (multi-queue-num-queues, then queue-<i>/ring-ref.. and
 * event-channel). Like blkback it keeps no table of ids: a reused id gets a
 * response per request. Closed with requests in flight stops taking new ones
 * and goes Closed once those are answered (xen_blkif_disconnect()'s -EBUSY
 * path; blkback itself switches to Closed at once and answers later: either
 * order must do for blkring).
 *
 * It is not Xen: a real run is the only proof. It proves the program's own
 * logic before one.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <linux/ioctl.h>
typedef uint16_t domid_t;
#include <xen/evtchn.h>
#include <xen/gntalloc.h>

#define PAGE 4096u
#define SIM_SECTORS 65536ull /* 32 MiB */
#define DEVID "51728"
#define FE "/local/domain/1/device/vbd/" DEVID
#define BE "/local/domain/0/backend/vbd/1/" DEVID
#define BE_ERROR "/local/domain/0/error/backend/vbd/1/" DEVID "/error"
#define MAX_ORDER 4

/* ------------------------------------------------------------ real calls */
static int (*real_open)(const char *, int, ...);
static ssize_t (*real_read)(int, void *, size_t);
static ssize_t (*real_write)(int, const void *, size_t);
static int (*real_close)(int);
static int (*real_ioctl)(int, unsigned long, ...);
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static int (*real_munmap)(void *, size_t);
static int (*real_access)(const char *, int);

static void init_real(void)
{
	if (real_open)
		return;
	real_open = dlsym(RTLD_NEXT, "open");
	real_read = dlsym(RTLD_NEXT, "read");
	real_write = dlsym(RTLD_NEXT, "write");
	real_close = dlsym(RTLD_NEXT, "close");
	real_ioctl = dlsym(RTLD_NEXT, "ioctl");
	real_mmap = dlsym(RTLD_NEXT, "mmap");
	real_munmap = dlsym(RTLD_NEXT, "munmap");
	real_access = dlsym(RTLD_NEXT, "access");
}

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int xs_fd = -1, gnt_fd = -1, evt_fd = -1;

/* ------------------------------------------------------------ grants */
#define MAX_GREFS 65536
#define GREF_BASE 100
static uint8_t *gref_page[MAX_GREFS];
static bool gref_revoked[MAX_GREFS];
static unsigned next_gref = GREF_BASE;
struct region {
	uint64_t index;
	uint8_t *mem;
	unsigned count;
	unsigned first_gref;
};
/* ended grants, handed out again last-in first-out as the guest kernel does */
static unsigned freed[64], nfreed;
/* SIM_REGRANT=1: another grant takes each ended ref at once (the ref is valid
 * again when the backend maps it) */
static bool regrant;
/* SIM_SERVE_REVOKED=1: a broken backend that maps an ended grant anyway */
static bool serve_revoked;
static struct region regions[256];
static unsigned nregions;
static uint64_t next_index;

static uint8_t *page_of(uint32_t gref)
{
	if (gref >= MAX_GREFS || !gref_page[gref] || (gref_revoked[gref] && !serve_revoked))
		return NULL;
	return gref_page[gref];
}

/* ------------------------------------------------------------ xenstore */
struct node {
	char path[160];
	char value[160];
};
static struct node nodes[1024];
static unsigned nnodes;

static struct node *find(const char *path)
{
	for (unsigned i = 0; i < nnodes; i++)
		if (!strcmp(nodes[i].path, path))
			return &nodes[i];
	return NULL;
}

static void put(const char *path, const char *value)
{
	struct node *n = find(path);
	if (!n) {
		n = &nodes[nnodes++];
		snprintf(n->path, sizeof n->path, "%s", path);
	}
	snprintf(n->value, sizeof n->value, "%s", value);
}

static void del(const char *path)
{
	struct node *n = find(path);
	if (n)
		*n = nodes[--nnodes];
}

/* XS_RM: the node and everything under it */
static void del_tree(const char *path)
{
	size_t len = strlen(path);
	del(path);
	for (unsigned i = 0; i < nnodes;) {
		if (!strncmp(nodes[i].path, path, len) && nodes[i].path[len] == '/')
			nodes[i] = nodes[--nnodes];
		else
			i++;
	}
}

static const char *get(const char *path)
{
	struct node *n = find(path);
	return n ? n->value : NULL;
}

static unsigned getu(const char *path, unsigned dflt)
{
	const char *v = get(path);
	return v ? (unsigned)strtoul(v, NULL, 10) : dflt;
}

/* ------------------------------------------------------------ the backend */
struct req {
	uint8_t operation, nr_segments;
	uint16_t handle;
	uint32_t pad;
	uint64_t id, sector;
	struct {
		uint32_t gref;
		uint8_t first, last, pad[2];
	} seg[11];
};
struct rsp {
	uint64_t id;
	uint8_t operation, pad;
	int16_t status;
	uint32_t pad2;
};
struct sring {
	uint32_t req_prod, req_event, rsp_prod, rsp_event;
	uint8_t pad[48];
	uint8_t ring[];
};

static uint8_t *disk;
/* one ring per queue; a response waits in `pend` until it is due (SIM_DELAY_MS:
 * a slow backing device, as dm-delay makes one) */
#define SIM_QUEUES 16
#define PEND_MAX 1024
struct pend {
	struct rsp r;
	uint64_t due;
};
struct bring {
	struct sring *sr;
	uint32_t req_cons, rsp_prod_pvt;
	bool halted;
	struct pend pend[PEND_MAX];
	unsigned phead, pcount;
};
static struct bring R[SIM_QUEUES];
static unsigned nrings, ring_size, max_queues = 4;
/* connected: the rings are mapped; taking: the ring threads take requests
 * (stopped at Closed, as kthread_stop(xenblkd)); closing_busy: Closed came
 * with responses still due (xen_blkif_disconnect()'s -EBUSY path) */
static bool connected, taking, closing_busy;
static uint64_t delay_ns;
static uint64_t st_rd, st_wr, st_f, st_ds, st_rd_sect, st_wr_sect, reads_served;
/* the earlier connections' final statistics: what the lab's dom0 sampler adds
 * to a later connection's (lab/sampling.py rebase) */
static uint64_t sum_rd, sum_wr, sum_f, sum_ds, sum_rd_sect, sum_wr_sect;
static bool corrupt, stale_ring, no_prepare, stuck_closing, one_queue;
static unsigned connects, refuse_connect, first_ring_size;

static int any_halted(void)
{
	for (unsigned q = 0; q < nrings; q++)
		if (R[q].halted)
			return 1;
	return 0;
}

static void write_stats(void)
{
	const char *path = getenv("SIM_STATS");
	if (!path)
		return;
	char tmp[300];
	snprintf(tmp, sizeof tmp, "%s.tmp", path);
	FILE *f = fopen(tmp, "w");
	if (!f)
		return;
	fprintf(f, "rd_req=%llu wr_req=%llu f_req=%llu ds_req=%llu rd_sect=%llu wr_sect=%llu halted=%d "
		"sum_rd_req=%llu sum_wr_req=%llu sum_f_req=%llu sum_ds_req=%llu sum_rd_sect=%llu sum_wr_sect=%llu\n",
		(unsigned long long)st_rd, (unsigned long long)st_wr, (unsigned long long)st_f,
		(unsigned long long)st_ds, (unsigned long long)st_rd_sect, (unsigned long long)st_wr_sect, any_halted(),
		(unsigned long long)(sum_rd + st_rd), (unsigned long long)(sum_wr + st_wr),
		(unsigned long long)(sum_f + st_f), (unsigned long long)(sum_ds + st_ds),
		(unsigned long long)(sum_rd_sect + st_rd_sect), (unsigned long long)(sum_wr_sect + st_wr_sect));
	fclose(f);
	rename(tmp, path);
}

static int transfer(bool is_read, uint64_t sector, uint32_t gref, uint8_t first, uint8_t last, uint64_t *nsect)
{
	uint8_t *p = page_of(gref);
	if (!p || first > last || last > 7)
		return -1;
	uint64_t n = (uint64_t)(last - first + 1);
	uint64_t at = sector + *nsect;
	if (at + n > SIM_SECTORS)
		return -1;
	if (is_read) {
		memcpy(p + first * 512, disk + at * 512, n * 512);
		if (corrupt && ++reads_served % 50 == 0)
			p[first * 512 + 100] ^= 0x5a;
	} else {
		memcpy(disk + at * 512, p + first * 512, n * 512);
	}
	*nsect += n;
	return 0;
}

static int16_t serve(const uint8_t *slot, uint8_t *op_out)
{
	struct req r;
	memcpy(&r, slot, sizeof r);
	*op_out = r.operation;
	if (r.operation == 3) { /* flush */
		st_f++;
		return 0;
	}
	if (r.operation == 5) { /* discard: operation, flag, handle, pad, id, sector, nr_sectors */
		uint64_t nr;
		memcpy(&nr, slot + 24, 8);
		st_ds++;
		if (r.sector + nr > SIM_SECTORS)
			return -1;
		memset(disk + r.sector * 512, 0, nr * 512);
		return 0;
	}
	bool is_read;
	uint64_t nsect = 0;
	if (r.operation == 6) { /* indirect */
		uint8_t iop = slot[1];
		uint16_t nseg;
		uint64_t sector;
		uint32_t igrefs[8];
		memcpy(&nseg, slot + 2, 2);
		memcpy(&sector, slot + 16, 8);
		memcpy(igrefs, slot + 28, sizeof igrefs);
		is_read = iop == 0;
		*op_out = iop;
		if (is_read)
			st_rd++;
		else
			st_wr++;
		if (nseg == 0 || nseg > 256)
			return -1;
		for (unsigned i = 0; i < nseg; i++) {
			uint8_t *ip = page_of(igrefs[i / 512]);
			if (!ip)
				return -1;
			uint32_t g;
			memcpy(&g, ip + (i % 512) * 8, 4);
			if (transfer(is_read, sector, g, ip[(i % 512) * 8 + 4], ip[(i % 512) * 8 + 5], &nsect))
				return -1;
		}
		if (is_read)
			st_rd_sect += nsect;
		else
			st_wr_sect += nsect;
		return 0;
	}
	if (r.operation != 0 && r.operation != 1)
		return -2;
	is_read = r.operation == 0;
	if (is_read)
		st_rd++;
	else
		st_wr++;
	if (r.nr_segments == 0 || r.nr_segments > 11)
		return -1; /* "Bad number of segments in request" */
	for (unsigned i = 0; i < r.nr_segments; i++)
		if (transfer(is_read, r.sector, r.seg[i].gref, r.seg[i].first, r.seg[i].last, &nsect))
			return -1;
	if (is_read)
		st_rd_sect += nsect;
	else
		st_wr_sect += nsect;
	return 0;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static unsigned pending_total(void)
{
	unsigned n = 0;
	for (unsigned q = 0; q < nrings; q++)
		n += R[q].pcount;
	return n;
}

/* One pass over a ring: take up to 8 requests (each served at once, its
 * response due after the delay), then put out the responses that are due. No
 * table of ids: a request is answered with whatever id it carried, so two
 * requests with one id get two responses, as blkback gives them. */
static void serve_ring(struct bring *b, uint64_t now)
{
	struct sring *sr = b->sr;
	if (taking && !b->halted) {
		uint32_t rp = __atomic_load_n(&sr->req_prod, __ATOMIC_ACQUIRE);
		if (rp - b->rsp_prod_pvt > ring_size) {
			b->halted = true; /* "Frontend provided bogus ring requests ... Halting ring processing" */
			fprintf(stderr, "blkring_sim: bogus ring requests (%u - %u); halting\n", rp, b->rsp_prod_pvt);
		} else if (b->req_cons != rp) {
			unsigned batch = 0;
			while (b->req_cons != rp && batch < 8 && b->pcount < PEND_MAX) {
				uint8_t *slot = sr->ring + (size_t)(b->req_cons & (ring_size - 1)) * 112;
				uint64_t id;
				memcpy(&id, slot + 8, 8);
				uint8_t op = 0;
				int16_t status = serve(slot, &op);
				b->req_cons++;
				struct pend *pd = &b->pend[(b->phead + b->pcount++) % PEND_MAX];
				pd->r = (struct rsp){ .id = id, .operation = op, .status = status };
				pd->due = now + delay_ns;
				batch++;
			}
			/* RING_FINAL_CHECK_FOR_REQUESTS */
			__atomic_store_n(&sr->req_event, b->req_cons + 1, __ATOMIC_RELEASE);
			write_stats();
		}
	}
	uint32_t old = b->rsp_prod_pvt;
	while (b->pcount && b->pend[b->phead].due <= now) {
		memcpy(sr->ring + (size_t)(b->rsp_prod_pvt & (ring_size - 1)) * 112, &b->pend[b->phead].r,
		       sizeof(struct rsp));
		b->rsp_prod_pvt++;
		b->phead = (b->phead + 1) % PEND_MAX;
		b->pcount--;
	}
	if (b->rsp_prod_pvt == old)
		return;
	__atomic_store_n(&sr->rsp_prod, b->rsp_prod_pvt, __ATOMIC_RELEASE);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	uint32_t ev = __atomic_load_n(&sr->rsp_event, __ATOMIC_RELAXED);
	if ((uint32_t)(b->rsp_prod_pvt - ev) < (uint32_t)(b->rsp_prod_pvt - old)) {
		uint64_t one = 1;
		if (real_write(evt_fd, &one, sizeof one) < 0)
			perror("blkring_sim: eventfd");
	}
}

static void *backend(void *arg)
{
	(void)arg;
	for (;;) {
		pthread_mutex_lock(&mu);
		if (connected) {
			uint64_t now = now_ns();
			for (unsigned q = 0; q < nrings; q++)
				serve_ring(&R[q], now);
			if (closing_busy && !pending_total()) {
				/* the busy disconnect finishes once nothing is in flight */
				closing_busy = false;
				connected = false;
				if (!stuck_closing)
					put(BE "/state", "6");
			}
		}
		pthread_mutex_unlock(&mu);
		struct timespec ts = { 0, 200000 }; /* a slow disk: 0.2 ms a batch */
		nanosleep(&ts, NULL);
	}
	return NULL;
}

/* xenbus_dev_fatal(): "<errno> <message>" in the error node, then Closing */
static void dev_fatal(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void dev_fatal(int err, const char *fmt, ...)
{
	char msg[200], v[220];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	snprintf(v, sizeof v, "%d %s", err, msg);
	fprintf(stderr, "blkring_sim: %s\n", v);
	put(BE_ERROR, v);
	put(BE "/state", "5");
}

/* read_per_ring_refs(): the refs and the port of one ring from `dir` (the
 * device's directory, or queue-<i>/), the order from the device's; false
 * after a dev_fatal */
static bool map_ring(struct bring *b, const char *dir, unsigned order)
{
	unsigned pages = 1u << order;
	char p[260], r0[260];
	snprintf(r0, sizeof r0, "%s/%s", dir, order ? "ring-ref0" : "ring-ref");
	const char *ref0 = get(r0);
	if (stale_ring && connects > 1) {
		/* the first connection's ring, mapped from whatever first page is there */
		ref0 = get(FE "/ring-ref0") ? get(FE "/ring-ref0") : get(FE "/ring-ref");
		pages = 1;
	}
	if (!ref0) {
		dev_fatal(EINVAL, "reading %s", r0);
		return false;
	}
	uint32_t g0 = (uint32_t)strtoul(ref0, NULL, 10);
	for (unsigned i = 1; i < pages; i++) {
		snprintf(p, sizeof p, "%s/ring-ref%u", dir, i);
		if (!get(p)) {
			dev_fatal(EINVAL, "reading %s", p);
			return false;
		}
		if (getu(p, 0) != g0 + i || page_of(g0 + i) != page_of(g0) + i * PAGE) {
			dev_fatal(ENOMEM, "mapping ring-ref port 5 (ring pages not contiguous)");
			return false;
		}
	}
	snprintf(p, sizeof p, "%s/event-channel", dir);
	if (!page_of(g0) || !get(p)) {
		dev_fatal(EINVAL, "bad connect (ring-ref %u, %s %s)", g0, p, get(p) ? "present" : "missing");
		return false;
	}
	memset(b, 0, sizeof *b);
	b->sr = (struct sring *)(void *)page_of(g0);
	return true;
}

static void connect_ring(void)
{
	connects++;
	if (connects == refuse_connect) {
		dev_fatal(EINVAL, "mapping ring-ref port 5 (SIM_REFUSE_CONNECT=%u)", refuse_connect);
		return;
	}
	unsigned order = getu(FE "/ring-page-order", 0);
	if (order > MAX_ORDER) {
		dev_fatal(EINVAL, "requested ring page order %u exceed max:%d", order, MAX_ORDER);
		return;
	}
	const char *proto = get(FE "/protocol");
	if (!proto || strcmp(proto, "x86_64-abi")) {
		dev_fatal(EINVAL, "unknown fe protocol %s", proto ? proto : "-");
		return;
	}
	unsigned nq = getu(FE "/multi-queue-num-queues", 1);
	if (nq == 0 || nq > max_queues) {
		dev_fatal(ENOSYS, "guest requested %u queues, exceeding the maximum of %u.", nq, max_queues);
		return;
	}
	/* SIM_ONE_QUEUE: only the first queue is mapped, whatever was asked */
	unsigned mapped = one_queue ? 1 : nq;
	for (unsigned q = 0; q < mapped; q++) {
		char dir[120];
		if (nq > 1)
			snprintf(dir, sizeof dir, FE "/queue-%u", q);
		else
			snprintf(dir, sizeof dir, FE);
		if (!map_ring(&R[q], dir, order))
			return;
	}
	nrings = mapped;
	ring_size = stale_ring && connects > 1 ? first_ring_size : 32u << order;
	if (connects == 1)
		first_ring_size = ring_size;
	sum_rd += st_rd;
	sum_wr += st_wr;
	sum_f += st_f;
	sum_ds += st_ds;
	sum_rd_sect += st_rd_sect;
	sum_wr_sect += st_wr_sect;
	st_rd = st_wr = st_f = st_ds = st_rd_sect = st_wr_sect = 0;
	closing_busy = false;
	connected = taking = true;
	char v[32];
	snprintf(v, sizeof v, "%llu", SIM_SECTORS);
	put(BE "/sectors", v);
	put(BE "/state", "4");
	write_stats();
}

/* blkback's frontend_changed(), for the states the frontend writes */
static void frontend_changed(const char *state)
{
	int st = atoi(state);
	pthread_mutex_lock(&mu);
	int be = (int)getu(BE "/state", 0);
	if (st == 3 && be == 2)
		connect_ring();
	else if (st == 5)
		put(BE "/state", "5");
	else if (st == 6) {
		/* xen_blkif_disconnect(): the ring threads stop; with requests in
		 * flight it is busy and finishes when they complete (SIM_STUCK_CLOSING:
		 * it never does, the backend stays in Closing) */
		taking = false;
		if (connected && pending_total()) {
			closing_busy = true;
		} else {
			connected = false;
			put(BE "/state", "6");
		}
	} else if (st == 1 && be == 6 && !no_prepare) {
		del(BE_ERROR);
		put(BE "/state", "2"); /* "prepare for reconnect" */
	}
	pthread_mutex_unlock(&mu);
}

/* ------------------------------------------------------------ xenbus wire */
static uint8_t reply[8192];
static size_t reply_len, reply_off;

static void xs_reply(uint32_t type, uint32_t req_id, const char *body, size_t len)
{
	uint32_t h[4] = { type, req_id, 0, (uint32_t)len };
	memcpy(reply, h, sizeof h);
	memcpy(reply + sizeof h, body, len);
	reply_len = sizeof h + len;
	reply_off = 0;
}

static void xs_handle(const uint8_t *msg, size_t len)
{
	uint32_t h[4];
	memcpy(h, msg, sizeof h);
	const char *payload = (const char *)msg + sizeof h;
	char path[200];
	const char *rel = payload;
	if (rel[0] == '/')
		snprintf(path, sizeof path, "%s", rel);
	else
		snprintf(path, sizeof path, "/local/domain/1/%s", rel);
	(void)len;
	if (h[0] == 2) { /* XS_READ */
		const char *v = get(path);
		if (!v)
			xs_reply(16, h[1], "ENOENT", 7);
		else
			xs_reply(2, h[1], v, strlen(v));
	} else if (h[0] == 13) { /* XS_RM: a missing node is no error when its parent exists */
		pthread_mutex_lock(&mu);
		del_tree(path);
		pthread_mutex_unlock(&mu);
		xs_reply(13, h[1], "OK", 3);
	} else if (h[0] == 11) { /* XS_WRITE: path NUL value */
		size_t plen = strlen(payload) + 1;
		char value[160];
		size_t vlen = h[3] - plen;
		if (vlen >= sizeof value)
			vlen = sizeof value - 1;
		memcpy(value, payload + plen, vlen);
		value[vlen] = 0;
		pthread_mutex_lock(&mu);
		put(path, value);
		pthread_mutex_unlock(&mu);
		if (!strcmp(path, FE "/state"))
			frontend_changed(value);
		xs_reply(11, h[1], "OK", 3);
	} else {
		xs_reply(16, h[1], "EINVAL", 7);
	}
}

/* ------------------------------------------------------------ the interposed calls */
static void child_after_fork(void)
{
	pthread_mutex_init(&mu, NULL);
}

static void setup_once(void)
{
	static bool done;
	if (done)
		return;
	done = true;
	disk = calloc(SIM_SECTORS, 512);
	corrupt = getenv("SIM_CORRUPT") && !strcmp(getenv("SIM_CORRUPT"), "1");
	stale_ring = getenv("SIM_STALE_RING") && !strcmp(getenv("SIM_STALE_RING"), "1");
	no_prepare = getenv("SIM_NO_PREPARE") && !strcmp(getenv("SIM_NO_PREPARE"), "1");
	refuse_connect = getenv("SIM_REFUSE_CONNECT") ? (unsigned)atoi(getenv("SIM_REFUSE_CONNECT")) : 0;
	stuck_closing = getenv("SIM_STUCK_CLOSING") && !strcmp(getenv("SIM_STUCK_CLOSING"), "1");
	one_queue = getenv("SIM_ONE_QUEUE") && !strcmp(getenv("SIM_ONE_QUEUE"), "1");
	regrant = getenv("SIM_REGRANT") && !strcmp(getenv("SIM_REGRANT"), "1");
	serve_revoked = getenv("SIM_SERVE_REVOKED") && !strcmp(getenv("SIM_SERVE_REVOKED"), "1");
	delay_ns = getenv("SIM_DELAY_MS") ? (uint64_t)atoi(getenv("SIM_DELAY_MS")) * 1000000ull : 0;
	if (getenv("SIM_MAX_QUEUES"))
		max_queues = (unsigned)atoi(getenv("SIM_MAX_QUEUES"));
	put(FE "/backend", BE);
	put(FE "/backend-id", "0");
	put(FE "/state", "1");
	put(BE "/state", "2");
	put(BE "/max-ring-page-order", "4"); /* MAX_ORDER */
	put(BE "/feature-max-indirect-segments", "256");
	if (max_queues) { /* SIM_MAX_QUEUES=0: no multi-queue-max-queues node (an old backend) */
		char mq[16];
		snprintf(mq, sizeof mq, "%u", max_queues);
		put(BE "/multi-queue-max-queues", mq);
	} else {
		max_queues = 1;
	}
	put(BE "/feature-persistent", "1");
	put(BE "/feature-flush-cache", "1");
	put(BE "/feature-discard", "1");
	put(BE "/sector-size", "512");
	evt_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	/* a child forked while the backend thread held the lock (blkring's
	 * lingering process) would wait for it forever: the thread is not copied */
	pthread_atfork(NULL, NULL, child_after_fork);
	pthread_t t;
	pthread_create(&t, NULL, backend, NULL);
}

int open(const char *path, int flags, ...)
{
	init_real();
	mode_t mode = 0;
	if (flags & O_CREAT) {
		va_list ap;
		va_start(ap, flags);
		mode = va_arg(ap, mode_t);
		va_end(ap);
	}
	if (!strcmp(path, "/dev/xen/xenbus")) {
		setup_once();
		return xs_fd = real_open("/dev/null", O_RDWR);
	}
	if (!strcmp(path, "/dev/xen/gntalloc"))
		return gnt_fd = real_open("/dev/null", O_RDWR);
	if (!strcmp(path, "/dev/xen/evtchn"))
		return dup(evt_fd);
	return real_open(path, flags, mode);
}
int open64(const char *path, int flags, ...) __attribute__((alias("open")));

static bool is_evt(int fd)
{
	if (evt_fd < 0 || fd == evt_fd)
		return false;
	/* the frontend's dup of the eventfd: same file */
	char a[64], b[64], la[128] = "", lb[128] = "";
	snprintf(a, sizeof a, "/proc/self/fd/%d", fd);
	snprintf(b, sizeof b, "/proc/self/fd/%d", evt_fd);
	ssize_t n = readlink(a, la, sizeof la - 1);
	ssize_t m = readlink(b, lb, sizeof lb - 1);
	return n > 0 && m > 0 && n == m && !memcmp(la, lb, (size_t)n) && strstr(la, "eventfd");
}

ssize_t read(int fd, void *buf, size_t n)
{
	init_real();
	if (fd >= 0 && fd == xs_fd) {
		size_t left = reply_len - reply_off;
		if (n > left)
			n = left;
		memcpy(buf, reply + reply_off, n);
		reply_off += n;
		return (ssize_t)n;
	}
	if (is_evt(fd)) {
		uint64_t c;
		if (real_read(fd, &c, sizeof c) != sizeof c)
			return -1;
		uint32_t port = 5;
		memcpy(buf, &port, sizeof port);
		return sizeof port;
	}
	return real_read(fd, buf, n);
}

ssize_t write(int fd, const void *buf, size_t n)
{
	init_real();
	if (fd >= 0 && fd == xs_fd) {
		xs_handle(buf, n);
		return (ssize_t)n;
	}
	if (is_evt(fd))
		return (ssize_t)n; /* unmask */
	return real_write(fd, buf, n);
}

int close(int fd)
{
	init_real();
	if (fd >= 0 && fd == gnt_fd) {
		/* gntalloc's release: the grants go (blkback would see "invalid buffer") */
		pthread_mutex_lock(&mu);
		for (unsigned g = GREF_BASE; g < next_gref; g++) {
			bool ring_page = false; /* a mapped ring page stays */
			for (unsigned q = 0; connected && q < nrings; q++)
				ring_page = ring_page || gref_page[g] == (uint8_t *)R[q].sr;
			if (!ring_page)
				gref_revoked[g] = true;
		}
		pthread_mutex_unlock(&mu);
		gnt_fd = -1;
	}
	return real_close(fd);
}

int ioctl(int fd, unsigned long req, ...)
{
	init_real();
	va_list ap;
	va_start(ap, req);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	if (req == IOCTL_GNTALLOC_ALLOC_GREF) {
		struct ioctl_gntalloc_alloc_gref *a = arg;
		if (a->domid != 0 || !(a->flags & GNTALLOC_FLAG_WRITABLE) || next_gref + a->count > MAX_GREFS ||
		    nregions >= 256) {
			errno = ENOSPC;
			return -1;
		}
		uint8_t *mem = real_mmap(NULL, (size_t)a->count * PAGE, PROT_READ | PROT_WRITE,
					 MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		if (mem == MAP_FAILED)
			return -1;
		pthread_mutex_lock(&mu);
		bool reuse = a->count == 1 && nfreed;
		unsigned first = reuse ? freed[--nfreed] : next_gref;
		for (unsigned i = 0; i < a->count; i++) {
			unsigned g = reuse ? first : next_gref++;
			gref_page[g] = mem + (size_t)i * PAGE;
			gref_revoked[g] = false;
			a->gref_ids[i] = g;
		}
		regions[nregions++] = (struct region){ next_index, mem, a->count, first };
		a->index = next_index;
		next_index += (uint64_t)a->count * PAGE;
		pthread_mutex_unlock(&mu);
		return 0;
	}
	if (req == IOCTL_GNTALLOC_DEALLOC_GREF) {
		struct ioctl_gntalloc_dealloc_gref *d = arg;
		pthread_mutex_lock(&mu);
		for (unsigned i = 0; i < nregions; i++) {
			if (regions[i].index != d->index || regions[i].count != d->count)
				continue;
			for (unsigned k = 0; k < d->count; k++) {
				unsigned g = regions[i].first_gref + k;
				if (regrant) /* someone else's page under the same ref now */
					gref_page[g] = regions[i].mem + (size_t)k * PAGE;
				else {
					gref_revoked[g] = true;
					if (nfreed < 64)
						freed[nfreed++] = g;
				}
			}
			pthread_mutex_unlock(&mu);
			return 0;
		}
		pthread_mutex_unlock(&mu);
		errno = EINVAL;
		return -1;
	}
	if (req == IOCTL_EVTCHN_BIND_UNBOUND_PORT) {
		static int next_port = 5; /* a port of its own for each queue */
		return next_port++;
	}
	if (req == IOCTL_EVTCHN_NOTIFY)
		return 0; /* the backend thread polls */
	return real_ioctl(fd, req, arg);
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	init_real();
	if (fd >= 0 && fd == gnt_fd) {
		for (unsigned i = 0; i < nregions; i++)
			if (regions[i].index == (uint64_t)off && (size_t)regions[i].count * PAGE == len)
				return regions[i].mem;
		errno = ENOENT;
		return MAP_FAILED;
	}
	return real_mmap(addr, len, prot, flags, fd, off);
}
void *mmap64(void *, size_t, int, int, int, off_t) __attribute__((alias("mmap")));

int munmap(void *addr, size_t len)
{
	init_real();
	for (unsigned i = 0; i < nregions; i++)
		if (regions[i].mem == addr)
			return 0; /* kept: the backend may still map it */
	return real_munmap(addr, len);
}

int access(const char *path, int mode)
{
	init_real();
	if (!strncmp(path, "/sys/bus/xen/", 13)) {
		errno = ENOENT;
		return -1;
	}
	return real_access(path, mode);
}
