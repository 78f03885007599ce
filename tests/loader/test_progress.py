"""The start-up progress bar fed by many reader threads: every byte arrives, in few steps."""

import threading

from sglang_fastload.loader.progress import ChunkProgress


def test_bytes_from_many_threads_all_reach_the_bar_in_about_one_percent_steps():
    updates = []
    total = 16 * 1000 * 6_000
    progress = ChunkProgress(updates.append, total)

    def reader():
        for _ in range(1000):
            progress(6_000)

    threads = [threading.Thread(target=reader) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    progress.flush()
    assert sum(updates) == total
    assert 90 <= len(updates) <= 101
    assert all(n >= total // 100 for n in updates[:-1])
