# Publish-to-receive latency: a log-linear histogram (values under 128 ns
# exact, then 64 sub-buckets per power of two: under 1.6 % error), so that
# recording is one increment and the histograms of several processes merge
# by adding counts per bucket.


cdef inline void _record_latency(Viewers self, const uint8_t* payload,
                                 uint64_t now) noexcept:
    """Every latency_every-th message of a decoded viewer: ``now`` minus the
    publisher's CLOCK_REALTIME stamp (the payload's first 8 bytes)."""
    cdef uint64_t ts
    self.lat_tick += 1
    if self.lat_tick >= self.latency_every:
        self.lat_tick = 0
        memcpy(&ts, payload, 8)        # little-endian hosts only
        if ts > now:
            self.lat_negative += 1
            ts = now
        ts = now - ts
        self.hist[lg_hist_index(ts)] += 1
        self.lat_count += 1
        self.lat_sum_ns += ts
        if ts > self.lat_max_ns:
            self.lat_max_ns = ts


def bucket_value(int index):
    """Representative value (the middle) of latency histogram bucket ``index``."""
    if index < 0 or index >= LG_HIST_BUCKETS:
        raise IndexError(index)
    return lg_hist_value(index)


def bucket_index(unsigned long long value):
    """Histogram bucket of ``value`` (nanoseconds)."""
    return lg_hist_index(value)


HIST_BUCKETS = LG_HIST_BUCKETS


def percentiles_of(buckets, percentiles=(50.0, 99.0, 99.9)):
    """Percentiles (ns) of a histogram given as ``[(index, count), ...]``
    (merged from several processes: add the counts per index)."""
    items = sorted(buckets)
    total = sum(c for _, c in items)
    out = []
    for p in percentiles:
        if not total:
            out.append(None)
            continue
        rank = max(1, int(-(-p * total // 100)))     # ceil(p% of total), at least 1
        seen = 0
        for index, count in items:
            seen += count
            if seen >= rank:
                out.append(lg_hist_value(index))
                break
    return out
