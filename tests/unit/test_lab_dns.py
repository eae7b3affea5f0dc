"""The lab's myip DNS responder, answer logic only (no sockets, no namespace)."""

from __future__ import annotations

from dnslib import QTYPE, RCODE, DNSHeader, DNSQuestion, DNSRecord

from gateway.lab import clients
from gateway.lab.dns import MYIP_NAME, answer

CLIENT = "198.51.100.10"


def _ask(name: str, qtype: str = "A") -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    ans = answer(q.pack(), CLIENT)
    assert ans is not None
    reply = DNSRecord.parse(ans.wire)
    assert reply.header.id == q.header.id and reply.header.qr == 1
    return reply


def test_myip_a_query_is_answered_with_the_querys_source_address() -> None:
    """An A query for myip.opendns.com gets one A record: the address the query came from."""
    reply = _ask("myip.opendns.com")
    assert reply.header.rcode == RCODE.NOERROR and reply.header.aa == 1
    assert [(str(rr.rname), rr.rtype, str(rr.rdata), rr.ttl) for rr in reply.rr] == [
        (MYIP_NAME, QTYPE.A, CLIENT, 0)
    ]


def test_the_name_is_matched_without_regard_to_case() -> None:
    """DNS names are case-insensitive (RFC 4343): MyIP.OpenDNS.com is the same name."""
    reply = _ask("MyIP.OpenDNS.com")
    assert [str(rr.rdata) for rr in reply.rr] == [CLIENT]


def test_other_types_of_myip_get_an_empty_noerror_answer() -> None:
    """AAAA (nslookup asks it after A) is NODATA for an IPv4 client, not an error."""
    reply = _ask("myip.opendns.com", "AAAA")
    assert reply.header.rcode == RCODE.NOERROR and reply.rr == []


def test_any_other_name_is_refused() -> None:
    """The responder is not a resolver: every other name is REFUSED, not answered."""
    reply = _ask("example.com")
    assert reply.header.rcode == RCODE.REFUSED and reply.rr == [] and reply.header.aa == 0


def test_a_response_or_garbage_is_never_answered() -> None:
    """A message with QR set, or bytes that are no DNS message, get no answer (no ping-pong)."""
    response = DNSRecord.question("myip.opendns.com").reply().pack()
    assert answer(response, CLIENT) is None
    assert answer(b"\x12", CLIENT) is None
    assert answer(b"", CLIENT) is None


def test_an_unsupported_opcode_is_notimp_and_no_question_is_formerr() -> None:
    """Only standard queries with one question are answered; others get the RFC 1035 rcode."""
    notify = DNSRecord(DNSHeader(id=7, opcode=4), q=DNSQuestion("myip.opendns.com"))
    ans = answer(notify.pack(), CLIENT)
    assert ans is not None and DNSRecord.parse(ans.wire).header.rcode == RCODE.NOTIMP
    empty = DNSRecord(DNSHeader(id=8))
    ans = answer(empty.pack(), CLIENT)
    assert ans is not None
    reply = DNSRecord.parse(ans.wire)
    assert reply.header.rcode == RCODE.FORMERR and reply.questions == []


def test_the_answer_record_says_what_was_asked_for_the_log() -> None:
    """The log fields: the name and type asked, the rcode and the address given."""
    ans = answer(DNSRecord.question("myip.opendns.com").pack(), CLIENT)
    assert ans is not None
    assert (ans.name, ans.qtype, ans.rcode, ans.address) == (MYIP_NAME, "A", "NOERROR", CLIENT)


def test_nslookup_output_is_read_past_the_servers_own_lines() -> None:
    """The address after "Name:" is the answer; the server's "Address: ip#53" is not."""
    text = ("Server:\t\t198.51.100.2\nAddress:\t198.51.100.2#53\n\n"
            "Name:\tmyip.opendns.com\nAddress: 198.51.100.10\n\n")
    assert clients.nslookup_addresses(text) == ["198.51.100.10"]
    assert clients.nslookup_addresses("** server can't find x: REFUSED\n") == []
