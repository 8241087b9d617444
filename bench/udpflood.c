/* udpflood: the small-packet load for bench/e2e.py, compiled there at run time.
 *
 *   udpflood send DST PORT SIZE SECONDS [PPS]
 *                                         sendmmsg() flood of SIZE-byte UDP payloads, as
 *                                         fast as it goes or paced at PPS datagrams a second
 *   udpflood sink PORT SECONDS IDLE       recvmmsg() counter; stops IDLE s after the
 *                                         last datagram, or after SECONDS
 *
 * C because a Python sender tops out far below what the in-kernel paths carry.
 * Each prints one JSON line; the sink first prints {"event": "listening"}.
 * The sink's rate is datagrams over first-to-last arrival: what got through. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 256
#define MAX_SIZE 2048

static char bufs[BATCH][MAX_SIZE];
static struct iovec iovs[BATCH];
static struct mmsghdr msgs[BATCH];

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static void setup_msgs(int size, int distinct)
{
	for (int i = 0; i < BATCH; i++) {
		iovs[i].iov_base = bufs[distinct ? i : 0];
		iovs[i].iov_len = size;
		msgs[i].msg_hdr.msg_iov = &iovs[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
}

/* Sleeps until t (CLOCK_MONOTONIC seconds). */
static void sleep_until(double t)
{
	struct timespec ts = {.tv_sec = (time_t)t, .tv_nsec = (long)((t - (time_t)t) * 1e9)};
	clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
}

/* pps 0: flat out; otherwise each datagram leaves at its time, in batches
 * only as large as the sender fell behind (a wake-up here takes tens of
 * microseconds), so the load is as even as the scheduler lets it be. */
static int send_flood(const char *dst, int port, int size, double seconds, double pps)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0 || inet_pton(AF_INET, dst, &sa.sin_addr) != 1 || connect(fd, (struct sockaddr *)&sa, sizeof sa)) {
		perror("udpflood send");
		return 1;
	}
	setup_msgs(size, 0);
	prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0); /* paced sleeps end on time, not 50 µs late */
	unsigned long long sent = 0, errors = 0;
	double t0 = now(), t = t0;
	while ((t = now()) < t0 + seconds) {
		unsigned int want = BATCH;
		if (pps > 0) {
			double due = (t - t0) * pps - sent;
			if (due < 1) {
				sleep_until(t0 + (sent + 1) / pps);
				continue;
			}
			want = due < BATCH ? (unsigned int)due : BATCH;
		}
		int n = sendmmsg(fd, msgs, want, 0);
		if (n > 0)
			sent += n;
		else
			errors++; /* ENOBUFS, or a refusal from a queued ICMP error: keep going */
	}
	printf("{\"sent\": %llu, \"errors\": %llu, \"seconds\": %.6f, \"pps\": %.0f}\n", sent, errors, t - t0,
	       sent / (t - t0));
	return 0;
}

static int sink(int port, double seconds, double idle)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
	struct timeval tv = {0, 50000}; /* wake up to check the clocks */
	int rcvbuf = 8 << 20;
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) ||
	    bind(fd, (struct sockaddr *)&sa, sizeof sa)) {
		perror("udpflood sink");
		return 1;
	}
	setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf); /* best effort: root only */
	setup_msgs(MAX_SIZE, 1);
	printf("{\"event\": \"listening\", \"port\": %d}\n", port);
	fflush(stdout);
	unsigned long long got = 0;
	double first = 0, last = 0, end = now() + seconds;
	for (;;) {
		int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
		double t = now();
		if (n > 0) {
			if (!got)
				first = t;
			got += n;
			last = t;
		}
		if (t > end || (got && t - last > idle))
			break;
	}
	double span = last - first;
	printf("{\"received\": %llu, \"seconds\": %.6f, \"pps\": %.0f}\n", got, span, span > 0 ? got / span : 0.0);
	return 0;
}

int main(int argc, char **argv)
{
	if ((argc == 6 || argc == 7) && !strcmp(argv[1], "send") && atoi(argv[4]) > 0 && atoi(argv[4]) <= MAX_SIZE)
		return send_flood(argv[2], atoi(argv[3]), atoi(argv[4]), atof(argv[5]), argc == 7 ? atof(argv[6]) : 0);
	if (argc == 5 && !strcmp(argv[1], "sink"))
		return sink(atoi(argv[2]), atof(argv[3]), atof(argv[4]));
	fprintf(stderr, "usage: udpflood send DST PORT SIZE SECONDS [PPS] | udpflood sink PORT SECONDS IDLE\n");
	return 2;
}
