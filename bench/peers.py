"""Python multiprocessing peers for procexec's benchmark (examples/bench).

Run by the benchmark itself: `python3 bench/peers.py <workload> <reps> [args]`.
Prints one line per measurement: `peer|items|seconds,seconds,...`, where the
seconds are one sample per repetition (W4 prints start-up and teardown as two peers).
"""
import concurrent.futures as cf
import multiprocessing as mp
import sys
import time

MASK = (1 << 64) - 1


def double(i):
    return 2 * i


def work(n):
    x = n
    for _ in range(n):
        x = (x * 6364136223846793005 + 1) & MASK
    return x


def echo(data):
    return data


def timed(reps, run):
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return samples


def report(peer, items, samples):
    print(f"{peer}|{items}|{','.join(f'{s:.9f}' for s in samples)}", flush=True)


def w1(reps, n, n_slow):
    with mp.get_context("fork").Pool(2) as pool:
        pool.map(double, range(1000))
        report("Pool.map (default chunks)", n, timed(reps, lambda: pool.map(double, range(n))))
        report("Pool.map (chunksize=1)", n_slow, timed(reps, lambda: pool.map(double, range(n_slow), chunksize=1)))
        report("Pool.imap_unordered", n_slow, timed(reps, lambda: list(pool.imap_unordered(double, range(n_slow)))))
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as executor:
        list(executor.map(double, range(100)))
        report("ProcessPoolExecutor.map", n_slow, timed(reps, lambda: list(executor.map(double, range(n_slow)))))


def w2(reps, tasks, target_s):
    n = 1000
    while True:  # calibrate one task to about target_s of compute
        start = time.perf_counter()
        work(n)
        took = time.perf_counter() - start
        if took > target_s / 4:
            n = int(n * target_s / took)
            break
        n *= 2
    sequential = timed(reps, lambda: [work(n) for _ in range(tasks)])
    report("sequential (1 process)", tasks, sequential)
    with mp.get_context("fork").Pool(2) as pool:
        report("Pool.map", tasks, timed(reps, lambda: pool.map(work, [n] * tasks)))


def w3(reps, tasks, size):
    # Distinct objects: pickle would send one object repeated in a chunk only once.
    base = b"\x07" * (size - 4)
    payloads = [base + i.to_bytes(4, "little") for i in range(tasks)]
    with mp.get_context("fork").Pool(2) as pool:
        pool.map(echo, payloads[:4])
        report("Pool.map", tasks, timed(reps, lambda: pool.map(echo, payloads)))
        report("Pool.imap_unordered", tasks, timed(reps, lambda: list(pool.imap_unordered(echo, payloads))))


def w4(reps):
    startups, teardowns = [], []
    for _ in range(reps):
        start = time.perf_counter()
        pool = mp.get_context("fork").Pool(2)
        pool.apply(double, (1,))
        started = time.perf_counter()
        pool.close()
        pool.join()
        startups.append(started - start)
        teardowns.append(time.perf_counter() - started)
    report("Pool(2) fork: start + first task", 1, startups)
    report("Pool(2) fork: close + join", 1, teardowns)


def w5(reps, calls):
    with mp.get_context("fork").Pool(2) as pool:
        for i in range(100):
            pool.apply(double, (i,))
        rtts = []
        for i in range(calls):
            start = time.perf_counter()
            pool.apply(double, (i,))
            rtts.append(time.perf_counter() - start)
        report("Pool.apply", 1, rtts)


def w11(reps, n, n_spawns):
    for size in (2, 16, 64, 256):
        builds, shutdowns, maps, applies = [], [], [], []
        for rep in range(reps):
            start = time.perf_counter()
            pool = mp.get_context("fork").Pool(size)
            builds.append(time.perf_counter() - start)
            pool.map(double, range(1000))
            if rep == 0:
                maps = timed(reps, lambda: pool.map(double, range(n)))
                applies = timed(reps, lambda: [r.get() for r in [pool.apply_async(double, (i,)) for i in range(n_spawns)]])
            start = time.perf_counter()
            pool.close()
            pool.join()
            shutdowns.append(time.perf_counter() - start)
        report(f"build, Pool({size}) fork", 1, builds)
        report(f"shutdown, Pool({size}) close + join", 1, shutdowns)
        report(f"map, Pool({size}).map (default chunks)", n, maps)
        report(f"apply_async each, Pool({size})", n_spawns, applies)


def w12(reps, *sizes_calls):
    names = {1024: "1 KiB", 1 << 20: "1 MiB", 16 << 20: "16 MiB", 60 << 20: "60 MiB"}
    with mp.get_context("fork").Pool(1) as pool:
        for size, calls in zip(sizes_calls[::2], sizes_calls[1::2]):
            data = b"\x07" * size
            pool.apply(echo, (data,))
            report(f"Pool(1).apply echo {names.get(size, size)}, bytes", size * calls,
                   timed(reps, lambda: [pool.apply(echo, (data,)) for _ in range(calls)]))


if __name__ == "__main__":
    workload, reps = sys.argv[1], int(sys.argv[2])
    args = [int(a) if a.isdigit() else float(a) for a in sys.argv[3:]]
    {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "W5": w5, "W11": w11, "W12": w12}[workload](reps, *args)
