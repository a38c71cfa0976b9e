"""Python peer for procexec's W9 shared-memory benchmark.

Lock/unlock pairs per second across 2 processes: each process takes
multiprocessing.Value's lock (`with value.get_lock(): value.value += 1`) N times.
Both start together behind a barrier; the figure is all pairs over the time from
the first start to the last end (time.time() in each process).

Run: python3 examples/bench/shared.py [--quick]
Prints one line: `lock_pairs_per_s <samples, comma-separated> <start method>`.
"""
import multiprocessing as mp
import sys
import time

PAIRS = 200_000
REPS = 5


def worker(value, barrier, pairs, out):
    barrier.wait()
    start = time.time()
    for _ in range(pairs):
        with value.get_lock():
            value.value += 1
    out.put((start, time.time()))


def run(pairs):
    value = mp.Value("q", 0)
    barrier = mp.Barrier(2)
    out = mp.Queue()
    processes = [mp.Process(target=worker, args=(value, barrier, pairs, out)) for _ in range(2)]
    for p in processes:
        p.start()
    spans = [out.get() for _ in processes]
    for p in processes:
        p.join()
    assert value.value == 2 * pairs, value.value
    return 2 * pairs / (max(end for _, end in spans) - min(start for start, _ in spans))


def main():
    quick = "--quick" in sys.argv
    pairs = PAIRS // 10 if quick else PAIRS
    reps = 2 if quick else REPS
    samples = [run(pairs) for _ in range(reps)]
    print("lock_pairs_per_s", ",".join(f"{s:.1f}" for s in samples), mp.get_start_method())


if __name__ == "__main__":
    main()
