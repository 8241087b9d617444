# The libc and Linux declarations that the datapath uses.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        unsigned short sa_family
    struct iovec:
        void *iov_base
        size_t iov_len
    int socket(int domain, int type, int protocol)
    int bind(int fd, const sockaddr *addr, socklen_t len)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t sendto(int fd, const void *buf, size_t n, int flags, const sockaddr *addr, socklen_t len)
    enum:
        AF_PACKET
        AF_INET
        SOCK_RAW
        SOCK_CLOEXEC
        SOCK_NONBLOCK
        SOL_SOCKET
        SO_SNDBUF
        SO_SNDBUFFORCE
        SO_MARK
        SO_ERROR
        SO_ATTACH_FILTER
        MSG_DONTWAIT

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr
    struct sockaddr_in:
        unsigned short sin_family
        unsigned short sin_port
        in_addr sin_addr
    enum:
        IPPROTO_IP
        IPPROTO_IPIP
        IPPROTO_RAW
        IP_RECVERR
        IP_HDRINCL

cdef extern from "<linux/if_ether.h>":
    enum:
        ETH_P_ALL
        ETH_P_IP

cdef extern from "<linux/if_packet.h>" nogil:
    struct sockaddr_ll:
        unsigned short sll_family
        unsigned short sll_protocol
        int sll_ifindex
        unsigned short sll_hatype
        unsigned char sll_pkttype
        unsigned char sll_halen
        unsigned char sll_addr[8]
    struct tpacket_req:
        unsigned int tp_block_size
        unsigned int tp_block_nr
        unsigned int tp_frame_size
        unsigned int tp_frame_nr
    struct tpacket2_hdr:
        uint32_t tp_status
        uint32_t tp_len
        uint32_t tp_snaplen
        uint16_t tp_mac
        uint16_t tp_net
    struct tpacket_stats:
        unsigned int tp_packets
        unsigned int tp_drops
    enum:
        SOL_PACKET
        PACKET_VERSION
        PACKET_RX_RING
        PACKET_TX_RING
        PACKET_LOSS
        PACKET_STATISTICS
        PACKET_VNET_HDR
        PACKET_FANOUT
        PACKET_FANOUT_HASH
        PACKET_FANOUT_CPU
        PACKET_FANOUT_FLAG_DEFRAG
        TPACKET_V2
        TP_STATUS_KERNEL
        TP_STATUS_USER
        TP_STATUS_AVAILABLE
        TP_STATUS_SEND_REQUEST
        TPACKET_ALIGNMENT
        TPACKET2_HDRLEN

cdef extern from "<linux/filter.h>" nogil:
    struct sock_filter:
        uint16_t code
        uint8_t jt
        uint8_t jf
        uint32_t k
    struct sock_fprog:
        unsigned short len
        sock_filter *filter

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    void *MAP_FAILED
    enum:
        PROT_READ
        PROT_WRITE
        MAP_SHARED
        MAP_LOCKED
        MAP_POPULATE

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLERR

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC

cdef extern from "<fcntl.h>" nogil:
    int fcntl(int fd, int cmd, ...)
    enum:
        F_GETFL
        F_SETFL
        O_NONBLOCK

cdef extern from "<sys/uio.h>" nogil:
    ssize_t writev(int fd, const iovec *iov, int n)

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t n)
    ssize_t write(int fd, const void *buf, size_t n)
    int close(int fd)
    int usleep(unsigned int usec)

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        ENOBUFS
        ENETDOWN
        EINTR
        EINVAL

cdef extern from "<net/if.h>" nogil:
    enum:
        IF_NAMESIZE
    char *if_indextoname(unsigned int ifindex, char *name)

cdef extern from "<stdlib.h>" nogil:
    void *aligned_alloc(size_t alignment, size_t size)

cdef extern from "<arpa/inet.h>" nogil:
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    enum:
        CLOCK_MONOTONIC

cdef extern from "<sys/prctl.h>" nogil:
    int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4, unsigned long arg5)
    enum:
        PR_SET_NAME
        PR_SET_TIMERSLACK

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from "<linux/virtio_net.h>" nogil:
    struct virtio_net_hdr:
        uint8_t flags
        uint8_t gso_type
        uint16_t hdr_len
        uint16_t gso_size
        uint16_t csum_start
        uint16_t csum_offset
    enum:
        VIRTIO_NET_HDR_F_NEEDS_CSUM
        VIRTIO_NET_HDR_F_DATA_VALID
        VIRTIO_NET_HDR_GSO_NONE
