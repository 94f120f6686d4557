"""Unit tests for proxyd.resolver: one lookup per name at a time, a short cache, no thread
for IP literals, failures not cached. The executor's getaddrinfo is replaced by a counter
that the test releases, so no real DNS is asked."""

from __future__ import annotations

import asyncio
import socket

import pytest

from proxyd.resolver import Resolver

INFOS = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 443))]


class FakeLoop:
    """Wraps the running loop; getaddrinfo answers when the test says so."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls: list[tuple[str, int]] = []
        self.answer: asyncio.Future = loop.create_future()

    async def getaddrinfo(self, host: str, port: int, **kw: object) -> list:
        self.calls.append((host, port))
        return await self.answer


def run(coro):
    return asyncio.run(coro)


def test_concurrent_lookups_of_one_name_share_one_executor_call():
    async def main():
        fake = FakeLoop(asyncio.get_running_loop())
        r = Resolver()
        waiters = [asyncio.ensure_future(r.resolve(fake, "origin.test", 443)) for _ in range(16)]
        await asyncio.sleep(0)
        fake.answer.set_result(INFOS)
        results = await asyncio.gather(*waiters)
        assert all(x == INFOS for x in results)
        assert fake.calls == [("origin.test", 443)] and r.lookups == 1
        # answered from the cache while fresh
        assert await r.resolve(fake, "origin.test", 443) == INFOS
        assert len(fake.calls) == 1
    run(main())


def test_answers_expire_after_the_ttl():
    async def main():
        fake = FakeLoop(asyncio.get_running_loop())
        fake.answer.set_result(INFOS)
        r = Resolver(ttl=0.0)
        await r.resolve(fake, "origin.test", 443)
        await r.resolve(fake, "origin.test", 443)
        assert len(fake.calls) == 2
    run(main())


def test_failures_reach_every_waiter_and_are_not_cached():
    async def main():
        fake = FakeLoop(asyncio.get_running_loop())
        r = Resolver()
        waiters = [asyncio.ensure_future(r.resolve(fake, "nx.test", 443)) for _ in range(3)]
        await asyncio.sleep(0)
        fake.answer.set_exception(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
        for w in waiters:
            with pytest.raises(socket.gaierror):
                await w
        fake.answer = asyncio.get_running_loop().create_future()
        fake.answer.set_result(INFOS)
        assert await r.resolve(fake, "nx.test", 443) == INFOS
        assert len(fake.calls) == 2
    run(main())


def test_a_cancelled_connect_does_not_cancel_the_shared_lookup():
    async def main():
        fake = FakeLoop(asyncio.get_running_loop())
        r = Resolver()
        impatient = asyncio.ensure_future(r.resolve(fake, "slow.test", 443))
        patient = asyncio.ensure_future(r.resolve(fake, "slow.test", 443))
        await asyncio.sleep(0)
        impatient.cancel()
        await asyncio.sleep(0)
        fake.answer.set_result(INFOS)
        assert await patient == INFOS
        assert impatient.cancelled() and len(fake.calls) == 1
    run(main())


@pytest.mark.parametrize("host, family", [("127.0.0.1", socket.AF_INET),
                                          ("::1", socket.AF_INET6)])
def test_ip_literals_need_no_lookup(host, family):
    async def main():
        fake = FakeLoop(asyncio.get_running_loop())
        infos = await Resolver().resolve(fake, host, 8443)
        assert fake.calls == []
        assert infos and all(i[0] == family and i[4][:2] == (host, 8443) for i in infos)
    run(main())
