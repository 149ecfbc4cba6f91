"""Within-round progress (issue 12): ``fedpeft.engines.send_and_receive`` waits for a round's
replies through Flower's own Grid API (push_messages, then pull_messages until all replied or the
round timeout) and returns exactly what Flower 1.41's ``Grid.send_and_receive`` returns, while
``fedpeft.tracking.RoundProgress`` shows clients finished / sampled, elapsed and an ETA: a line
redrawn in place on a terminal, a plain line every 30 s otherwise.

In-process, on a fake clock (no sleeping, no Ray): replies are released over several pulls."""

import io
import re
from types import SimpleNamespace

import pytest
from flwr.superlink.grid import http_grid, inmemory_grid
from flwr.superlink.grid.http_grid import HttpGrid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid
from omegaconf import OmegaConf

from fedpeft.engines import get as get_engine
from fedpeft.engines import send_and_receive
from fedpeft.serverapp import Federation
from fedpeft.tracking import RoundProgress, duration
from tests.harness import FakeGrid


class Clock:
    """A fake ``time``: ``sleep`` advances ``time``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now, self.slept = now, []

    def time(self) -> float:
        return self.now

    def sleep(self, dt: float) -> None:
        self.slept.append(dt)
        self.now += dt


class ScriptedGrid(FakeGrid):
    """A FakeGrid that also speaks Flower's push/pull API: node ``n``'s reply is released at pull
    number ``release[n]`` (1-based; ``None``: never), and a pulled reply is gone (as from the
    SuperLink's state). ``unpushable``: nodes whose message the grid could not push (``HttpGrid``
    returns ``None`` for them). ``pull_interval``: ``None`` leaves the attribute off (``HttpGrid``)."""

    def __init__(self, release: dict[int, int | None], pull_interval: float | None = 0.1, unpushable=(), on_pull=None):
        super().__init__({n: i for i, n in enumerate(release)})
        self.release, self.unpushable, self.on_pull = dict(release), set(unpushable), on_pull
        if pull_interval is not None:
            self.pull_interval = pull_interval
        self.pulls, self.pending, self.blocking_calls = 0, {}, 0

    def push_messages(self, messages):
        ids = []
        for m in messages:
            node = m.metadata.dst_node_id
            if node in self.unpushable:
                ids.append(None)
                continue
            mid = f"msg-{node}"
            self.pending[mid] = node
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.on_pull is not None:
            self.on_pull(self.pulls)
        out = []
        for mid in sorted(i for i in message_ids if i is not None):
            node = self.pending.get(mid)
            when = self.release.get(node)
            if node is not None and when is not None and when <= self.pulls:
                del self.pending[mid]
                out.append(SimpleNamespace(metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=mid)))
        return out

    def send_and_receive(self, msgs, *, timeout=None):  # the blocking call rounds() must not use any more
        self.blocking_calls += 1
        return super().send_and_receive(msgs, timeout=timeout)


def message(node: int):
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node))


def flower(grid_cls, module, monkeypatch, release, timeout, **kw):
    """What Flower's own ``grid_cls.send_and_receive`` returns on a ScriptedGrid: (replies, clock)."""
    clock = Clock()
    grid = ScriptedGrid(release, **kw)
    with monkeypatch.context() as m:
        m.setattr(module, "time", SimpleNamespace(time=clock.time, sleep=clock.sleep))
        replies = grid_cls.send_and_receive(grid, [message(n) for n in release], timeout=timeout)
    return [(m.metadata.src_node_id, m.metadata.reply_to_message_id) for m in replies], clock, grid


def ours(release, timeout, **kw):
    clock, seen = Clock(), []
    grid = ScriptedGrid(release, **kw)
    replies = send_and_receive(grid, [message(n) for n in release], timeout, seen.append, clock=clock.time, sleep=clock.sleep)
    return [(m.metadata.src_node_id, m.metadata.reply_to_message_id) for m in replies], clock, grid, seen


CASES = {
    "all reply over several pulls": dict(release={1: 1, 2: 3, 3: 3, 4: 6}, timeout=3600.0),
    "one node never replies": dict(release={1: 2, 2: None, 3: 4}, timeout=2.0),
    "no timeout": dict(release={5: 9, 6: 1}, timeout=None),
    "timeout before a reply": dict(release={1: 50}, timeout=0.35),
    "a message that could not be pushed": dict(release={1: 1, 2: 2}, timeout=1.0, unpushable={2}),
    "nothing sampled": dict(release={}, timeout=10.0),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("grid_cls,module,interval", [(InMemoryGrid, inmemory_grid, 0.1), (HttpGrid, http_grid, None)], ids=["inmemory", "http"])
def test_replies_equal_flowers_send_and_receive(case, grid_cls, module, interval, monkeypatch):
    kw = dict(CASES[case])
    release, timeout = kw.pop("release"), kw.pop("timeout")
    if grid_cls is HttpGrid and timeout is not None and timeout < 5:
        timeout *= 30  # HttpGrid pulls every 3 s: a timeout that still falls between the releases
    want, want_clock, want_grid = flower(grid_cls, module, monkeypatch, release, timeout, pull_interval=interval, **kw)
    got, got_clock, got_grid, seen = ours(release, timeout, pull_interval=interval, **kw)
    assert got == want
    assert got_grid.pulls == want_grid.pulls and got_clock.slept == want_clock.slept  # the same pulls, the same sleeps
    assert seen == sorted(seen) and len(seen) == got_grid.pulls  # on_poll after every pull, counts never go down
    if seen:
        assert seen[-1] == len(got)


def test_a_node_that_never_replies_is_left_out_and_the_wait_ends_at_the_timeout():
    got, clock, grid, seen = ours({1: 1, 2: None, 3: 2}, 1.0)
    assert [node for node, _ in got] == [1, 3]
    assert seen[:2] == [1, 2] and set(seen[2:]) == {2}
    assert 1.0 <= clock.now - 1000.0 < 1.0 + 0.1 + 1e-9  # stops at the first check past the timeout
    assert all(dt == 0.1 for dt in clock.slept)  # the grid's pull interval


def test_httpgrids_three_second_interval_for_a_grid_without_pull_interval():
    _, clock, _, _ = ours({1: 3}, 100.0, pull_interval=None)
    assert clock.slept == [3.0, 3.0]


# ------------------------------------------------------------------ progress lines


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def drive(progress: RoundProgress, clock: Clock, done_at, until: float, step: float = 0.1) -> None:
    """Poll ``progress`` every ``step`` seconds until ``until`` (seconds after start), ``done_at(t)``
    clients done at time t."""
    t0 = clock.now
    while clock.now - t0 <= until + 1e-9:
        progress.update(done_at(clock.now - t0))
        clock.now += step


def test_duration():
    assert [duration(s) for s in (0, 0.4, 45, 59.6, 130, 3599, 3780, 7200)] == ["0s", "0s", "45s", "1m00s", "2m10s", "59m59s", "1h03m", "2h00m"]


def test_plain_lines_every_30s_with_counts_and_eta():
    clock, out = Clock(), io.StringIO()
    progress = RoundProgress(2, 5, 100, stream=out, clock=clock.time)
    drive(progress, clock, lambda t: 0 if t < 40 else min(100, int((t - 30) / 3)), until=200, step=1.0)
    progress.close()
    lines = out.getvalue().splitlines()
    assert out.getvalue().endswith("\n") and "\r" not in out.getvalue()
    assert lines[0] == "[fedpeft] training round 2/5: 0/100 clients done, 30s elapsed, ETA —"
    # at 60 s: 10 done in 60 s, so 90 more take 540 s
    assert lines[1] == "[fedpeft] training round 2/5: 10/100 clients done, 1m00s elapsed, ETA 9m00s"
    assert len(lines) == 6  # 30, 60, ..., 180 s
    parsed = [re.fullmatch(r"\[fedpeft\] training round 2/5: (\d+)/100 clients done, (\S+) elapsed, ETA (\S+)", line) for line in lines]
    assert all(parsed), lines
    assert [m[2] for m in parsed] == ["30s", "1m00s", "1m30s", "2m00s", "2m30s", "3m00s"]
    assert [m[1] for m in parsed] == ["0", "10", "20", "30", "40", "50"]
    assert all((m[3] == "—") == (m[1] == "0") for m in parsed)


def test_the_example_eta():
    clock, out = Clock(), io.StringIO()
    progress = RoundProgress(1, 3, 100, stream=out, clock=clock.time)
    clock.now += 130
    progress.update(37)
    assert out.getvalue() == "[fedpeft] training round 1/3: 37/100 clients done, 2m10s elapsed, ETA 3m41s\n"  # 130/37 × 63 = 221 s


def test_plain_lines_never_flood_a_log():
    clock, stamps = Clock(), []

    class Stamped(io.StringIO):
        def write(self, s):
            stamps.append(clock.now)
            return super().write(s)

    progress = RoundProgress(1, 1, 1000, stream=Stamped(), clock=clock.time)
    drive(progress, clock, lambda t: min(1000, int(t * 2)), until=600, step=0.05)  # a reply every 0.5 s, a pull every 0.05 s
    assert len(stamps) in (19, 20)  # one every 30 s (and a pull's lateness)
    assert all(b - a >= 30 - 1e-9 for a, b in zip(stamps, stamps[1:]))


def test_no_progress_line_reads_as_a_finished_round():
    """``[fedpeft] round k/R`` is the round's summary, written once the round is complete: launchers
    and the end-to-end tests wait for that prefix, so a line written while it runs must not have it."""
    for stream in (io.StringIO(), Tty()):
        clock = Clock()
        progress = RoundProgress(1, 50, 4, stream=stream, clock=clock.time)
        drive(progress, clock, lambda t: min(4, int(t / 20)), until=90, step=0.5)
        lines = [l for l in re.split(r"[\r\n]", stream.getvalue()) if l.strip()]
        assert lines and all(l.startswith("[fedpeft] training round 1/50") for l in lines)
        assert not any(l.startswith("[fedpeft] round 1/50") for l in lines)


def test_a_round_over_at_once_prints_nothing():
    for stream in (io.StringIO(), Tty()):
        clock = Clock()
        progress = RoundProgress(1, 1, 10, stream=stream, clock=clock.time)
        drive(progress, clock, lambda t: min(10, int(t * 20)), until=0.8)
        progress.close()
        assert stream.getvalue() == ""


def draws_of(text: str) -> list[str]:
    return [d.rstrip() for d in text.split("\r") if d.strip()]


def test_terminal_line_is_redrawn_in_place_and_cleared():
    clock, out = Clock(), Tty()
    progress = RoundProgress(3, 4, 20, stream=out, clock=clock.time)
    drive(progress, clock, lambda t: min(20, int(t * 2)), until=5.25, step=0.25)  # a client every half second
    text = out.getvalue()
    assert "\n" not in text
    draws = draws_of(text)
    assert draws[0] == "[fedpeft] training round 3/4 [#---------] 2/20 clients done, 1s elapsed, ETA 9s"
    assert draws[-1] == "[fedpeft] training round 3/4 [#####-----] 10/20 clients done, 5s elapsed, ETA 5s"
    assert len(draws) == 9  # from 1 s on, one per new reply (2..10), none for the pulls in between
    progress.close()
    assert draws_of(out.getvalue()) == draws and out.getvalue().endswith("\r")  # cleared: blanks over the last line
    assert out.getvalue()[len(text):].strip() == ""
    progress.close()  # twice is harmless


def test_terminal_line_fits_the_terminal(monkeypatch):
    class Narrow(Tty):
        def fileno(self):
            return 99

    monkeypatch.setattr("os.get_terminal_size", lambda fd: __import__("os").terminal_size((60 if fd == 99 else 1000, 24)))
    clock, out = Clock(), Narrow()
    progress = RoundProgress(10, 10, 100, stream=out, clock=clock.time)
    clock.now += 610
    progress.update(37)
    (draw,) = draws_of(out.getvalue())
    assert len(draw) <= 59 and draw.startswith("[fedpeft] training round 10/10 [")  # no wrap


def test_terminal_line_without_new_replies_is_redrawn_once_a_second():
    clock, out = Clock(), Tty()
    progress = RoundProgress(1, 1, 8, stream=out, clock=clock.time)
    drive(progress, clock, lambda t: 0, until=5.0, step=0.25)
    assert draws_of(out.getvalue()) == [f"[fedpeft] training round 1/1 [----------] 0/8 clients done, {s}s elapsed, ETA —" for s in range(1, 6)]


def test_a_shorter_terminal_line_blanks_the_rest_of_the_longer_one():
    clock, out = Clock(), Tty()
    progress = RoundProgress(1, 1, 100, stream=out, clock=clock.time)
    clock.now += 3700
    progress.update(1)  # ETA 101h.. (long)
    clock.now += 1
    progress.update(99)  # ETA 37s (short)
    first, second = out.getvalue().split("\r")[1:3]
    assert len(second) >= len(first.rstrip()) and second.rstrip().endswith("ETA 37s")


def etas(text: str) -> list[tuple[int, float | None]]:
    """(clients done, ETA in seconds) of every line or draw; None for ``ETA —``."""
    out = []
    for m in re.finditer(r"(\d+)/\d+ clients done, \S+ elapsed, ETA (\S+)", text):
        eta = m[2]
        if eta == "—":
            out.append((int(m[1]), None))
            continue
        h, mi, s = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", eta).groups()
        out.append((int(m[1]), int(h or 0) * 3600 + int(mi or 0) * 60 + int(s or 0)))
    return out


@pytest.mark.parametrize("stream", [Tty, io.StringIO])
def test_the_eta_counts_down_between_replies(stream, monkeypatch):
    """It said "ETA 1m52s" a second before the round ended: the estimate was elapsed/done × the
    clients out, re-read every poll, so it rose with the clock while no reply came. Now it is fixed at
    each reply: between two replies the ETA never rises."""
    monkeypatch.setattr(RoundProgress, "every", 1.0)
    clock, out = Clock(), stream()
    progress = RoundProgress(1, 1, 10, stream=out, clock=clock.time)
    replies = [5, 6, 30, 31, 32, 80, 81, 82, 83, 120]  # bursts and long gaps, as stragglers make them
    drive(progress, clock, lambda t: sum(r <= t for r in replies), until=119, step=0.5)
    seen = etas(out.getvalue())
    assert len(seen) > 50
    for (d1, e1), (d2, e2) in zip(seen, seen[1:]):
        if d1 == d2 and e1 is not None:
            assert e2 <= e1, seen
    late = [e for d, e in seen if d == 9]  # the last reply comes at 120 s: the ETA reaches 0s and stays there
    assert late[-1] == 0 and late == sorted(late, reverse=True)


def test_the_first_eta_comes_from_the_previous_round():
    clock, out = Clock(), io.StringIO()
    progress = RoundProgress(2, 3, 4, previous=100.0, stream=out, clock=clock.time)
    clock.now += 30
    progress.update(0)  # nothing back yet: the previous round took 100 s
    clock.now += 10
    progress.update(1)  # 1 of 4 at 40 s: by rate 160 s, blended with the previous round's 100 s by the share out: 115 s
    clock.now += 30
    progress.update(1)
    assert etas(out.getvalue()) == [(0, 70), (1, 45)]
    assert RoundProgress(1, 3, 4, stream=io.StringIO(), clock=clock.time).eta(0, 5.0) == "—"  # no previous round


# ------------------------------------------------------------------ Federation.rounds


def test_rounds_wait_through_push_and_pull_and_show_progress(monkeypatch, capsys):
    """The round loop hands aggregate_train exactly the pulled replies, never calls the blocking
    send_and_receive, and prints the progress lines before the round's summary."""
    monkeypatch.setattr(RoundProgress, "every", 0.0)  # a plain line after every pull
    pulled = []
    grid = ScriptedGrid({7: 1, 8: 2, 9: 2}, pull_interval=0.0, on_pull=pulled.append)
    aggregated = []
    fed = object.__new__(Federation)
    fed.cfg = OmegaConf.create({"rounds": 2, "engine": {"round_timeout": 60.0, "kind": "per_client"}})
    fed.state = None
    fed.engine = get_engine(fed.cfg.engine)
    fed.secure = None
    fed.adapter = SimpleNamespace(arrays=lambda: "arrays0", partition_of={}, check_partitions=lambda grid: None)
    fed.strategy = SimpleNamespace(
        configure_train=lambda r, arrays, config, g: iter([message(n) for n in (7, 8, 9)]),  # an iterator: counted once
        aggregate_train=lambda r, replies: (aggregated.append((r, sorted(m.metadata.src_node_id for m in replies))), (f"arrays{r}", None))[1],
        configure_evaluate=lambda r, arrays, config, g: [],  # no personalised evaluation (Flower's evaluate step: nothing to send)
    )
    fed.evaluate = lambda r, arrays: {"arrays": arrays}
    fed.record = lambda r, row: print(f"summary {r} {row['arrays']}")
    fed.rounds(grid)
    assert grid.blocking_calls == 0
    assert aggregated == [(1, [7, 8, 9]), (2, [7, 8, 9])]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "summary 0 arrays0"
    assert lines[1].startswith("[fedpeft] training round 1/2: 1/3 clients done, ")
    assert lines[2].startswith("[fedpeft] training round 1/2: 3/3 clients done, ")
    assert lines[3] == "summary 1 arrays1"
    assert lines[4].startswith("[fedpeft] training round 2/2: 3/3 clients done, ")  # pull 3 releases all (the script counts on)
    assert lines[5:] == ["summary 2 arrays2"]


def test_rounds_clear_the_terminal_line_when_the_wait_fails(monkeypatch):
    out = Tty()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr(RoundProgress, "delay", 0.0)

    def boom(n):
        if n == 2:
            raise KeyboardInterrupt

    grid = ScriptedGrid({7: 5}, pull_interval=0.0, on_pull=boom)
    fed = object.__new__(Federation)
    fed.cfg = OmegaConf.create({"rounds": 1, "engine": {"round_timeout": 60.0, "kind": "per_client"}})
    fed.state = {"round": 0}
    fed.engine = get_engine(fed.cfg.engine)
    fed.secure = None
    fed.adapter = SimpleNamespace(arrays=lambda: None, partition_of={}, check_partitions=lambda grid: None)
    fed.strategy = SimpleNamespace(configure_train=lambda *a: [message(7)])
    with pytest.raises(KeyboardInterrupt):
        fed.rounds(grid)
    text = out.getvalue()
    assert text.startswith("\r[fedpeft] training round 1/1 [") and text.endswith("\r" + " " * len(text.split("\r")[1]) + "\r")
