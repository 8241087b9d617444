# The tunnel's outer-header rules and its forwarding table, from Python
# values; the reasons a packet is dropped, by name.

TX_REASONS = tuple(ipf_tx_reason_names[i].decode() for i in range(1, IPF_TX_NREASONS))
RX_REASONS = tuple(ipf_rx_reason_names[i].decode() for i in range(1, IPF_RX_NREASONS))


cdef uint32_t ip4(str addr) except? 0:
    """Dotted quad -> network-order u32."""
    return htonl(int(ipaddress.IPv4Address(addr)))


cdef int set_tunnel(ipf_tunnel *tn, str local_ip, int mtu, object ttl, object tos, bint pmtudisc,
                    bint ignore_df) except -1:
    """Fills the outer-header rules; ttl/tos None means inherit (as tunl0)."""
    if not 68 <= mtu <= 65535:
        raise ValueError(f"mtu {mtu} out of range 68..65535")
    if ttl is not None and not 1 <= ttl <= 255:
        raise ValueError(f"ttl {ttl} out of range 1..255")
    if tos is not None and not 0 <= tos <= 255:
        raise ValueError(f"tos {tos} out of range 0..255")
    memset(tn, 0, sizeof(ipf_tunnel))
    tn.src = ip4(local_ip)
    tn.mtu = mtu
    tn.ttl = 0 if ttl is None else ttl
    tn.tos_inherit = tos is None
    tn.tos = 0 if tos is None else tos
    tn.df_fixed = pmtudisc
    tn.df_inherit = not ignore_df
    return 0


cdef ipf_lpm_route *lpm_routes(object entries, uint64_t values) except NULL:
    """entries (prefix as host-order int, length, value below `values`) as
    the LPM's routes, to free()."""
    cdef Py_ssize_t i
    cdef ipf_lpm_route *r = <ipf_lpm_route *>malloc((len(entries) or 1) * sizeof(ipf_lpm_route))
    if r == NULL:
        raise MemoryError()
    try:
        for i, (prefix, length, value) in enumerate(entries):
            if not 0 <= length <= 32 or not 0 <= value < values:
                raise ValueError(f"bad route entry {(prefix, length, value)!r}")
            r[i].prefix = prefix
            r[i].len = length
            r[i].value = value
    except BaseException:
        free(r)
        raise
    return r


cdef ipf_table *build_table(object routes, object peers, bytes local_mac, uint64_t generation,
                            uint32_t count_rows) except NULL:
    """routes: (prefix host-order int, length, peer index); peers: (ip
    host-order int, next-hop MAC bytes or None[, path MTU]); local_mac:
    this node's on the underlay; count_rows: the loops that count per peer
    in it (two a worker)."""
    cdef Py_ssize_t n_routes = len(routes), n_peers = len(peers), i
    cdef const uint8_t *src_mac
    if local_mac is None or len(local_mac) != 6:
        raise ValueError("local_mac must be 6 bytes")
    src_mac = <const uint8_t *><const char *>local_mac
    cdef ipf_lpm_route *r = lpm_routes(routes, n_peers)
    cdef ipf_peer *p = <ipf_peer *>calloc(n_peers or 1, sizeof(ipf_peer))
    cdef ipf_table *t = NULL
    try:
        if p == NULL:
            raise MemoryError()
        for i, peer in enumerate(peers):
            ip, mac = peer[0], peer[1]
            p[i].ip = htonl(ip)
            p[i].pmtu = peer[2] if len(peer) > 2 else 0
            if mac is not None:
                if len(mac) != 6:
                    raise ValueError(f"bad MAC {mac!r}")
                memcpy(p[i].mac, <const char *>mac, 6)
                p[i].has_mac = 1
        with nogil:
            t = ipf_table_build(r, n_routes, p, n_peers, src_mac, generation, count_rows)
        if t == NULL:
            raise MemoryError("cannot build the forwarding table")
        return t
    finally:
        free(r)
        free(p)
