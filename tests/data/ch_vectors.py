"""Reference placements for the consistent-hash placer, computed
independently of the Rust code: SipHash-2-4 (checked against the vectors of
the SipHash paper) keyed with Fn's keys (0, 0x4c617279426f6174), then jump
consistent hash exactly as its paper gives it (Lamping & Veach 2014, the C++
listing, double arithmetic; Python floats are IEEE doubles). Prints the
vectors that tests/placer.rs hard-codes.

Fn's Go port (api/runnerpool/ch_placer.go) computes the jump with integer
division, `(b+1) * ((1<<31)/(key>>33) + 1)`, which always jumps at least to
2(b+1): with two runners every function starts at runner 0, and runner 1 of
three is never first. fnrunner follows the paper; `fn_jump` below shows the
Go variant for comparison.

    python3 tests/data/ch_vectors.py
"""
M = (1 << 64) - 1

def rotl(x, b):
    return ((x << b) | (x >> (64 - b))) & M

def siphash24(k0, k1, data):
    v0 = k0 ^ 0x736F6D6570736575
    v1 = k1 ^ 0x646F72616E646F6D
    v2 = k0 ^ 0x6C7967656E657261
    v3 = k1 ^ 0x7465646279746573
    def rnd():
        nonlocal v0, v1, v2, v3
        v0 = (v0 + v1) & M; v1 = rotl(v1, 13); v1 ^= v0; v0 = rotl(v0, 32)
        v2 = (v2 + v3) & M; v3 = rotl(v3, 16); v3 ^= v2
        v0 = (v0 + v3) & M; v3 = rotl(v3, 21); v3 ^= v0
        v2 = (v2 + v1) & M; v1 = rotl(v1, 17); v1 ^= v2; v2 = rotl(v2, 32)
    n = len(data)
    end = n - n % 8
    for i in range(0, end, 8):
        m = int.from_bytes(data[i:i + 8], "little")
        v3 ^= m; rnd(); rnd(); v0 ^= m
    last = (n & 0xFF) << 56
    last |= int.from_bytes(data[end:] + bytes(8 - (n - end)), "little") & ((1 << 56) - 1)
    v3 ^= last; rnd(); rnd(); v0 ^= last
    v2 ^= 0xFF
    rnd(); rnd(); rnd(); rnd()
    return v0 ^ v1 ^ v2 ^ v3

# The SipHash paper's vectors: key 00..0f, messages 00, 00 01, ...
KEY0 = int.from_bytes(bytes(range(8)), "little")
KEY1 = int.from_bytes(bytes(range(8, 16)), "little")
assert siphash24(KEY0, KEY1, b"") == 0x726FDB47DD0E0E31
assert siphash24(KEY0, KEY1, bytes(range(15))) == 0xA129CA6149BE45E5

def jump(key, buckets):
    """The paper's JumpConsistentHash (double arithmetic)."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & M
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b

# The paper's jump hash spreads keys evenly: 10,000 keys over 10 buckets.
_counts = [0] * 10
for _k in range(10000):
    _counts[jump(siphash24(0, 0x4C617279426F6174, str(_k).encode()), 10)] += 1
assert all(900 < c < 1100 for c in _counts), _counts

def fn_jump(key, buckets):
    """Fn's Go variant, with Go's int64/uint64 wrapping arithmetic."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & M
        shifted = key >> 33
        # Go would panic dividing by zero here; fnrunner treats it as "no
        # further jump", which ends the loop.
        if shifted == 0:
            break
        step = ((1 << 31) // shifted + 1) & M
        j = (b + 1) * step
        if j >= 1 << 63:  # int64 overflow wraps negative in Go
            j -= 1 << 64
    return b

FN_K0, FN_K1 = 0, 0x4C617279426F6174
IDS = ["hello", "echo", "counter", "bench-0", "bench-1", "app/route", "a", "",
       "fn-with-a-rather-long-name-0123456789", "ünïcode"]
for count in (1, 2, 3, 5, 10):
    for fid in IDS:
        h = siphash24(FN_K0, FN_K1, fid.encode())
        print(f'("{fid}", {count}, 0x{h:016x}, {jump(h, count)}),')
