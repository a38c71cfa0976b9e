"""Python multiprocessing channel peers for procexec's "channels" benchmark.

Message throughput between processes through multiprocessing.Queue and
multiprocessing.Pipe (duplex=False, send/recv), in three directions:

  worker->parent  a child puts/sends N messages, the parent gets/receives them;
  parent->worker  the parent puts/sends, a child gets/receives and then sets a
                  done event; the parent stops the clock when it sees the event;
  worker->worker  one child puts/sends, another gets/receives and sets the done
                  event; the parent times from the start to that event.

Each message is a `bytes` payload of the given size. Processes are started and
wait on a barrier with the parent; the clock starts when the barrier releases,
so process start-up is not timed. Each measurement is repeated with fresh
processes and the median is printed.

Start method: the platform default (no set_start_method call): 'fork' on Linux
up to Python 3.13, 'forkserver' from 3.14, 'spawn' on macOS and Windows. The
workers are module-level functions, so every start method works; the one used
is printed in each line as "start_method".

Run: python3 examples/bench/channels.py [--quick] [--size N]...
Prints one JSON object per line on stdout:
  {"peer":"python Queue","direction":"worker->parent","size":64,
   "msgs_per_s":...,"bytes_per_s":...,"messages":...,"reps":...,"start_method":"fork",
   "samples":"<msgs/s of each repetition, comma-separated>"}
bytes_per_s counts payload bytes only; the line is flat (no nested values).
"""
import json
import multiprocessing as mp
import statistics
import sys
import time

# Messages per measurement: ~0.5-1 s per run on a 2-core machine (Queue ~120k
# msgs/s at 64 B, ~15k at 64 KiB; Pipe about twice as fast at 64 B).
COUNTS = {64: 120_000, 65536: 12_000}
REPS = 5
QUICK_DIVISOR = 20
QUICK_REPS = 2


def payload(size):
    return bytes(size)


# Queue ends.
def q_put(q, barrier, n, size):
    data = payload(size)
    barrier.wait()
    for _ in range(n):
        q.put(data)


def q_get(q, barrier, n, done):
    barrier.wait()
    for _ in range(n):
        q.get()
    done.set()


# Pipe ends.
def p_send(conn, barrier, n, size):
    data = payload(size)
    barrier.wait()
    for _ in range(n):
        conn.send(data)
    conn.close()


def p_recv(conn, barrier, n, done):
    barrier.wait()
    for _ in range(n):
        conn.recv()
    done.set()


def worker_to_parent(ctx, kind, n, size):
    barrier = ctx.Barrier(2)
    if kind == "Queue":
        q = ctx.Queue()
        child = ctx.Process(target=q_put, args=(q, barrier, n, size))
        child.start()
        barrier.wait()
        start = time.perf_counter()
        for _ in range(n):
            q.get()
        took = time.perf_counter() - start
    else:
        receiver, sender = ctx.Pipe(duplex=False)
        child = ctx.Process(target=p_send, args=(sender, barrier, n, size))
        child.start()
        sender.close()
        barrier.wait()
        start = time.perf_counter()
        for _ in range(n):
            receiver.recv()
        took = time.perf_counter() - start
        receiver.close()
    child.join()
    return took


def parent_to_worker(ctx, kind, n, size):
    barrier = ctx.Barrier(2)
    done = ctx.Event()
    data = payload(size)
    if kind == "Queue":
        q = ctx.Queue()
        child = ctx.Process(target=q_get, args=(q, barrier, n, done))
        child.start()
        barrier.wait()
        start = time.perf_counter()
        for _ in range(n):
            q.put(data)
        done.wait()
        took = time.perf_counter() - start
        q.close()
        q.join_thread()
    else:
        receiver, sender = ctx.Pipe(duplex=False)
        child = ctx.Process(target=p_recv, args=(receiver, barrier, n, done))
        child.start()
        receiver.close()
        barrier.wait()
        start = time.perf_counter()
        for _ in range(n):
            sender.send(data)
        done.wait()
        took = time.perf_counter() - start
        sender.close()
    child.join()
    return took


def worker_to_worker(ctx, kind, n, size):
    barrier = ctx.Barrier(3)
    done = ctx.Event()
    if kind == "Queue":
        q = ctx.Queue()
        producer = ctx.Process(target=q_put, args=(q, barrier, n, size))
        consumer = ctx.Process(target=q_get, args=(q, barrier, n, done))
    else:
        receiver, sender = ctx.Pipe(duplex=False)
        producer = ctx.Process(target=p_send, args=(sender, barrier, n, size))
        consumer = ctx.Process(target=p_recv, args=(receiver, barrier, n, done))
    producer.start()
    consumer.start()
    if kind == "Pipe":
        receiver.close()
        sender.close()
    barrier.wait()
    start = time.perf_counter()
    done.wait()
    took = time.perf_counter() - start
    producer.join()
    consumer.join()
    return took


DIRECTIONS = [
    ("worker->parent", worker_to_parent),
    ("parent->worker", parent_to_worker),
    ("worker->worker", worker_to_worker),
]


def main(argv):
    quick = "--quick" in argv
    sizes = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--size" and i + 1 < len(argv):
            sizes.append(int(argv[i + 1]))
            i += 1
        elif arg.startswith("--size="):
            sizes.append(int(arg.split("=", 1)[1]))
        i += 1
    if not sizes:
        sizes = sorted(COUNTS)
    reps = QUICK_REPS if quick else REPS
    ctx = mp.get_context()
    for size in sizes:
        # Sizes other than the two planned ones: about 1.3 GB or 200k messages.
        n = COUNTS.get(size, max(1000, min(200_000, 1_300_000_000 // max(size, 1))))
        if quick:
            n = max(100, n // QUICK_DIVISOR)
        for kind in ("Queue", "Pipe"):
            for direction, run in DIRECTIONS:
                run(ctx, kind, max(10, n // 100), size)  # warm-up, not counted
                samples = [run(ctx, kind, n, size) for _ in range(reps)]
                rates = [n / s for s in samples]
                msgs = statistics.median(rates)
                line = {
                    "peer": f"python {kind}",
                    "direction": direction,
                    "size": size,
                    "msgs_per_s": round(msgs, 1),
                    "bytes_per_s": round(msgs * size, 1),
                    "messages": n,
                    "reps": reps,
                    "start_method": ctx.get_start_method(),
                    # Every repetition's msgs/s, comma-separated (keeps the line flat).
                    "samples": ",".join(f"{r:.1f}" for r in rates),
                }
                print(json.dumps(line, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
