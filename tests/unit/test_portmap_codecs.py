"""PCP (RFC 6887), NAT-PMP (RFC 6886) and UPnP-IGD codecs on byte vectors written field by field from the
RFCs' layouts, plus Hypothesis fuzzing: the response parsers raise only their own parse errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcppunch.portmap import natpmp, pcp, upnp

NONCE = bytes.fromhex("0102030405060708090a0b0c")
V4_MAPPED_CLIENT = bytes.fromhex("00000000000000000000ffff0a000102")  # ::ffff:10.0.1.2
V4_MAPPED_EXTERNAL = bytes.fromhex("00000000000000000000ffffc6336465")  # ::ffff:198.51.100.101


# ------------------------------------------------------------------------------------------------ PCP
def test_pcp_map_request_layout() -> None:
    expected = (
        bytes([2, 1]) + bytes(2)  # version 2, R=0 opcode MAP, reserved
        + (7200).to_bytes(4, "big")  # requested lifetime
        + V4_MAPPED_CLIENT  # PCP client's IP address
        + NONCE  # mapping nonce
        + bytes([6]) + bytes(3)  # protocol TCP, reserved
        + (40000).to_bytes(2, "big") + (40001).to_bytes(2, "big")  # internal port, suggested external port
        + bytes(10) + b"\xff\xff" + bytes(4)  # suggested external address ::ffff:0.0.0.0
    )
    request = pcp.MapRequest(NONCE, "10.0.1.2", 40000, 7200, suggested_port=40001)
    assert request.encode() == expected
    assert len(expected) == 60


def test_pcp_delete_is_lifetime_zero() -> None:
    data = pcp.MapRequest(NONCE, "10.0.1.2", 40000, 0).encode()
    assert data[4:8] == bytes(4)


def test_pcp_announce_request_layout() -> None:
    assert pcp.announce_request("10.0.1.2") == bytes([2, 0, 0, 0]) + bytes(4) + V4_MAPPED_CLIENT


def _map_response(result: int, lifetime: int = 3600, epoch: int = 1234, port: int = 40000) -> bytes:
    return (
        bytes([2, 0x81, 0, result])  # version, R=1 + MAP, reserved, result code
        + lifetime.to_bytes(4, "big") + epoch.to_bytes(4, "big") + bytes(12)  # lifetime, epoch, reserved
        + NONCE + bytes([6]) + bytes(3) + (40000).to_bytes(2, "big") + port.to_bytes(2, "big")
        + V4_MAPPED_EXTERNAL
    )


def test_pcp_map_response_success() -> None:
    response = pcp.parse_response(_map_response(0, port=41000))
    assert response.ok and response.opcode is pcp.Opcode.MAP
    assert (response.lifetime, response.epoch) == (3600, 1234)
    assert response.mapping == pcp.MapResult(NONCE, 6, 40000, 41000, "198.51.100.101")


def test_pcp_map_response_error_codes_are_enums() -> None:
    response = pcp.parse_response(_map_response(8, lifetime=30))
    assert response.result is pcp.ResultCode.NO_RESOURCES and not response.ok
    assert not response.result.is_long_lived
    assert pcp.ResultCode.NOT_AUTHORIZED.is_long_lived
    bare = bytes([2, 0x81, 0, 2]) + (1800).to_bytes(4, "big") + bytes(16)  # error answered with the header only
    assert pcp.parse_response(bare).result is pcp.ResultCode.NOT_AUTHORIZED


def test_pcp_response_with_option_is_skipped_after_length_check() -> None:
    option = bytes([1, 0, 0, 16]) + bytes(16)  # THIRD_PARTY, 16-byte address
    assert pcp.parse_response(_map_response(0) + option).ok
    with pytest.raises(pcp.PcpParseError, match="runs past"):
        pcp.parse_response(_map_response(0) + bytes([1, 0, 0, 20]) + bytes(16))


@pytest.mark.parametrize("data, why", [
    (bytes(20), "shorter"),
    (bytes([2, 0x81, 0, 0]) + bytes(21), "multiple of 4"),
    (bytes([1, 0x81]) + bytes(58), "version 1"),
    (bytes([2, 0x01]) + bytes(58), "R bit"),
    (bytes([2, 0x81, 0, 99]) + bytes(56), "result code 99"),
    (bytes([2, 0x81, 0, 0]) + bytes(20), "without its 36-byte"),
])
def test_pcp_rejects(data: bytes, why: str) -> None:
    with pytest.raises(pcp.PcpParseError, match=why):
        pcp.parse_response(data)


def test_pcp_epoch_check() -> None:
    assert pcp.epoch_consistent(1000, 50.0, 1010, 60.0)
    assert not pcp.epoch_consistent(1000, 50.0, 5, 60.0)  # the server restarted
    assert not pcp.epoch_consistent(1000, 50.0, 1002, 150.0)  # its clock stood still while ours ran 100 s


@given(st.binary(max_size=1200))
def test_pcp_parser_fuzz(data: bytes) -> None:
    """Any bytes: a PcpParseError, or a response whose header really is a PCP response's."""
    try:
        response = pcp.parse_response(data)
    except pcp.PcpParseError:
        return
    assert data[0] == 2 and data[1] & 0x80 and len(data) % 4 == 0 and response.result == data[3]


@given(st.integers(0, 13), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 65535))
def test_pcp_response_fields_roundtrip(result: int, lifetime: int, epoch: int, port: int) -> None:
    response = pcp.parse_response(_map_response(result, lifetime, epoch, port))
    assert (int(response.result), response.lifetime, response.epoch) == (result, lifetime, epoch)
    assert response.mapping is not None and response.mapping.external_port == port


# ------------------------------------------------------------------------------------------------ NAT-PMP
def test_natpmp_requests_layout() -> None:
    assert natpmp.external_address_request() == b"\x00\x00"
    assert natpmp.map_request(40000, 3600, 40001) == bytes.fromhex("0002" "0000" "9c40" "9c41" "00000e10")
    assert natpmp.map_request(40000, 0) == bytes.fromhex("0002" "0000" "9c40" "0000" "00000000")  # delete


def test_natpmp_address_response() -> None:
    data = bytes.fromhex("0080" "0000" "00000151" "c6336465")  # op 128, success, epoch 337, 198.51.100.101
    assert natpmp.parse_response(data) == natpmp.AddressResponse(natpmp.ResultCode.SUCCESS, 337, "198.51.100.101")


def test_natpmp_map_response() -> None:
    data = bytes.fromhex("0082" "0000" "00000151" "9c40" "a028" "00000e10")
    assert natpmp.parse_response(data) == natpmp.MapResponse(natpmp.ResultCode.SUCCESS, 337, 40000, 41000, 3600)


def test_natpmp_error_responses() -> None:
    refused = natpmp.parse_response(bytes.fromhex("0082" "0002" "00000151" "9c40" "0000" "00000000"))
    assert refused.result is natpmp.ResultCode.NOT_AUTHORIZED
    short = natpmp.parse_response(bytes.fromhex("0080" "0003" "00000009"))  # header-only error
    assert short.result is natpmp.ResultCode.NETWORK_FAILURE


@pytest.mark.parametrize("data, why", [
    (b"\x00\x80\x00", "shorter"),
    (bytes.fromhex("0280000000000000c6336465"), "version 2"),
    (bytes.fromhex("0002000000000000c6336465"), "bit 7"),
    (bytes.fromhex("0082000000000001"), "mapping response of 8"),
    (bytes.fromhex("0080000900000001c6336465"), "9"),
])
def test_natpmp_rejects(data: bytes, why: str) -> None:
    with pytest.raises(natpmp.NatPmpParseError, match=why):
        natpmp.parse_response(data)


@given(st.binary(max_size=64))
def test_natpmp_parser_fuzz(data: bytes) -> None:
    """Any bytes: a NatPmpParseError, or a response of one of the three sizes with bit 7 set."""
    try:
        response = natpmp.parse_response(data)
    except natpmp.NatPmpParseError:
        return
    assert data[0] == 0 and data[1] & 0x80 and len(data) in (8, 12, 16) and response.epoch == int.from_bytes(data[4:8])


# ------------------------------------------------------------------------------------------------ UPnP-IGD
SSDP_ANSWER = (b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: urn:schemas-upnp-org:device:"
               b"InternetGatewayDevice:1\r\nLocation: http://10.0.1.1:5000/rootDesc.xml\r\n\r\n")
DESCRIPTION = b"""<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0"><device><deviceList>
<device><serviceList>
<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
<controlURL>/ctl/IPConn1</controlURL></service>
<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:2</serviceType>
<controlURL>/ctl/IPConn</controlURL></service>
</serviceList></device></deviceList></device></root>"""


def test_ssdp() -> None:
    request = upnp.search_request()
    assert request.startswith(b"M-SEARCH * HTTP/1.1\r\n") and b'MAN: "ssdp:discover"' in request
    assert upnp.parse_search_response(SSDP_ANSWER) == "http://10.0.1.1:5000/rootDesc.xml"
    with pytest.raises(upnp.UpnpParseError, match="LOCATION"):
        upnp.parse_search_response(b"HTTP/1.1 200 OK\r\nLOCATION: file:///etc/passwd\r\n\r\n")


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 200 OK\r\nLOCATION: http://[10.0.1.1/\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nLOCATION: http://10.0.1.1:99999/\r\n\r\n",
])
def test_ssdp_bad_urls_are_parse_errors(data: bytes) -> None:
    with pytest.raises(upnp.UpnpParseError, match="bad URL"):
        upnp.parse_search_response(data)


def test_description_with_odd_encoding_or_url_is_a_parse_error() -> None:
    with pytest.raises(upnp.UpnpParseError):
        upnp.parse_description(b'<?xml version="1.0" encoding="klingon"?><root/>', "http://10.0.1.1/")
    bad = DESCRIPTION.replace(b"/ctl/IPConn<", b"http://[::1/x<")
    with pytest.raises(upnp.UpnpParseError, match="URL"):
        upnp.parse_description(bad, "http://10.0.1.1:5000/rootDesc.xml")


def test_description_picks_best_service() -> None:
    service = upnp.parse_description(DESCRIPTION, "http://10.0.1.1:5000/rootDesc.xml")
    assert service == upnp.Service("http://10.0.1.1:5000/ctl/IPConn", "urn:schemas-upnp-org:service:WANIPConnection:2")
    assert service.version == 2
    with pytest.raises(upnp.UpnpParseError, match="no WANIPConnection"):
        upnp.parse_description(b"<root/>", "http://10.0.1.1/")
    with pytest.raises(upnp.UpnpParseError, match="DTD"):
        upnp.parse_description(b'<!DOCTYPE x [<!ENTITY a "aaaa">]><root>&a;</root>', "http://10.0.1.1/")


def test_soap_request_and_answers() -> None:
    service = upnp.Service("http://10.0.1.1:5000/ctl/IPConn", "urn:schemas-upnp-org:service:WANIPConnection:2")
    args = upnp.add_port_mapping_args(40000, 40000, "10.0.1.2", 3600, "a<b")
    request = upnp.soap_request(service, "AddPortMapping", args)
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /ctl/IPConn HTTP/1.1\r\nHost: 10.0.1.1:5000\r\n")
    assert b'SOAPAction: "urn:schemas-upnp-org:service:WANIPConnection:2#AddPortMapping"' in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"<NewExternalPort>40000</NewExternalPort><NewProtocol>TCP</NewProtocol>" in body
    assert b"<NewPortMappingDescription>a&lt;b</NewPortMappingDescription>" in body
    ok = (b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/"
          b"envelope/\"><s:Body><u:GetExternalIPAddressResponse xmlns:u=\"x\"><NewExternalIPAddress>198.51.100.101"
          b"</NewExternalIPAddress></u:GetExternalIPAddressResponse></s:Body></s:Envelope>")
    assert upnp.parse_soap_response(ok, "GetExternalIPAddress") == {"NewExternalIPAddress": "198.51.100.101"}
    envelope = (b"<s:Envelope xmlns:s=\"e\"><s:Body>"
             b"<s:Fault><detail><UPnPError xmlns=\"urn:schemas-upnp-org:control-1-0\"><errorCode>718</errorCode>"
             b"<errorDescription>ConflictInMappingEntry</errorDescription></UPnPError></detail></s:Fault>"
                b"</s:Body></s:Envelope>")
    fault = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n%sTRAILING" % (len(envelope), envelope)
    with pytest.raises(upnp.UpnpActionError) as caught:
        upnp.parse_soap_response(fault, "AddPortMapping")
    assert caught.value.code is upnp.UpnpErrorCode.CONFLICT_IN_MAPPING_ENTRY


def test_chunked_body() -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n<a/>\r\n0\r\n\r\n"
    assert upnp.parse_http_body(data) == (200, b"<a/>")


@given(st.binary(max_size=600))
def test_upnp_parsers_fuzz(data: bytes) -> None:
    """Any bytes: the parsers' own errors only, and a LOCATION is always an http URL."""
    try:
        location = upnp.parse_search_response(data)
    except upnp.UpnpParseError:
        location = "http://"
    assert location.startswith("http://")
    for parse in (lambda d: upnp.parse_description(d, "http://10.0.1.1/"),
                  lambda d: upnp.parse_soap_response(d, "AddPortMapping")):
        try:
            parse(data)
        except (upnp.UpnpParseError, upnp.UpnpActionError):
            continue
