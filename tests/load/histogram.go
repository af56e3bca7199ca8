package load

import (
	"math"
	"math/bits"
	"time"
)

// histogram counts latencies in log-linear buckets: exact below 128ns, then
// 128 buckets per power of two, so a bucket is at most 1/128 (0.8%) wide.
// Memory is bounded (a few thousand buckets) however many samples it holds.
type histogram struct {
	counts []uint64
	total  uint64
}

const (
	subBits = 7
	subN    = 1 << subBits
	maxLat  = 1<<42 - 1 // ~73 minutes; longer latencies land in the last bucket
)

func bucketOf(v uint64) int {
	if v < subN {
		return int(v)
	}
	e := bits.Len64(v) - subBits - 1
	return (e+1)*subN + int(v>>e) - subN
}

// bucketMid is the middle of bucket i's range.
func bucketMid(i int) uint64 {
	if i < subN {
		return uint64(i)
	}
	e := i/subN - 1
	low := uint64(i%subN+subN) << e
	return low + (uint64(1)<<e)/2
}

func (h *histogram) add(d time.Duration) {
	v := uint64(max(d, 0))
	v = min(v, maxLat)
	i := bucketOf(v)
	if i >= len(h.counts) {
		h.counts = append(h.counts, make([]uint64, i+1-len(h.counts))...)
	}
	h.counts[i]++
	h.total++
}

func (h *histogram) merge(o *histogram) {
	if len(o.counts) > len(h.counts) {
		h.counts = append(h.counts, make([]uint64, len(o.counts)-len(h.counts))...)
	}
	for i, n := range o.counts {
		h.counts[i] += n
	}
	h.total += o.total
}

// quantile returns the latency at quantile q in [0,1], 0 when empty.
func (h *histogram) quantile(q float64) time.Duration {
	if h.total == 0 {
		return 0
	}
	rank := max(uint64(math.Ceil(q*float64(h.total))), 1)
	var seen uint64
	for i, n := range h.counts {
		seen += n
		if seen >= rank {
			return time.Duration(bucketMid(i))
		}
	}
	return time.Duration(bucketMid(len(h.counts) - 1))
}
