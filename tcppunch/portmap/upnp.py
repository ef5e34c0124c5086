"""UPnP-IGD (the Internet Gateway Device control protocol), sans-I/O: SSDP search, device description,
SOAP actions on WANIPConnection / WANPPPConnection.

Only the four actions a host needs: GetExternalIPAddress, AddPortMapping, AddAnyPortMapping (IGD v2) and
DeletePortMapping. Every parser takes bytes and raises :class:`UpnpParseError` (or, for a SOAP fault,
:class:`UpnpActionError` with the device's error code), never anything else, so the driver can drop a
bad answer and go on. Sizes are bounded (:data:`MAX_HTTP`): a device cannot make us buffer without end.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from enum import IntEnum
from urllib.parse import SplitResult, urljoin, urlsplit
from xml.sax.saxutils import escape

SSDP_GROUP = "239.255.255.250"
SSDP_PORT = 1900
IGD_SEARCH_TARGET = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
MAX_HTTP = 64 * 1024  # a root description is a few kB; anything this large is not a gateway's
# Services that can map ports, best first (IGD v2 adds AddAnyPortMapping).
WAN_SERVICES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
_SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
_CONTROL_NS = "urn:schemas-upnp-org:control-1-0"


class UpnpErrorCode(IntEnum):
    """UPnP action error codes a gateway returns in a SOAP fault (UPnP Device Architecture, IGD specs)."""

    INVALID_ACTION = 401
    INVALID_ARGS = 402
    ACTION_FAILED = 501
    ARGUMENT_VALUE_INVALID = 600
    ACTION_NOT_AUTHORIZED = 606
    NO_SUCH_ENTRY_IN_ARRAY = 714
    WILDCARD_NOT_PERMITTED_IN_SRC_IP = 715
    WILDCARD_NOT_PERMITTED_IN_EXT_PORT = 716
    CONFLICT_IN_MAPPING_ENTRY = 718
    SAME_PORT_VALUES_REQUIRED = 724
    ONLY_PERMANENT_LEASES_SUPPORTED = 725
    REMOTE_HOST_ONLY_SUPPORTS_WILDCARD = 726
    EXTERNAL_PORT_ONLY_SUPPORTS_WILDCARD = 727
    NO_PORT_MAPS_AVAILABLE = 728
    CONFLICT_WITH_OTHER_MECHANISMS = 729
    UNKNOWN = 0  # a code not listed here (the raw number is in UpnpActionError.raw_code)


class UpnpParseError(ValueError):
    """The bytes are not a well-formed SSDP, HTTP, description or SOAP answer."""


class UpnpActionError(Exception):
    """The gateway answered an action with a SOAP fault."""

    def __init__(self, raw_code: int, description: str) -> None:
        try:
            self.code = UpnpErrorCode(raw_code)
        except ValueError:
            self.code = UpnpErrorCode.UNKNOWN
        self.raw_code = raw_code
        super().__init__(f"UPnP error {raw_code} ({self.code.name}): {description}")


def search_request(mx: int = 1) -> bytes:
    """An SSDP M-SEARCH for Internet Gateway Devices (sent to the multicast group and to the gateway)."""
    return (
        "M-SEARCH * HTTP/1.1\r\n"
        f"HOST: {SSDP_GROUP}:{SSDP_PORT}\r\n"
        'MAN: "ssdp:discover"\r\n'
        f"MX: {mx}\r\n"
        f"ST: {IGD_SEARCH_TARGET}\r\n\r\n"
    ).encode()


def parse_search_response(data: bytes) -> str:
    """The LOCATION (description URL) of an SSDP search answer; UpnpParseError if it is none."""
    status, headers, _ = _split_http(data, require_body=False)
    if not status.startswith("HTTP/1.1 200"):
        raise UpnpParseError(f"SSDP answer is not a 200: {status[:60]!r}")
    location = headers.get("location", "")
    parts = _split_url(location)
    if parts.scheme != "http" or not parts.hostname:
        raise UpnpParseError(f"SSDP LOCATION is not an http URL: {location[:100]!r}")
    return location


@dataclass(frozen=True)
class Service:
    """A WAN connection service of the gateway: where to POST actions, and which service type it is."""

    control_url: str
    service_type: str

    @property
    def version(self) -> int:
        return int(self.service_type.rsplit(":", 1)[1])


def parse_description(body: bytes, location: str) -> Service:
    """The best port-mapping service in a device description (XML), its control URL made absolute."""
    root = _xml(body)
    found: dict[str, str] = {}
    base = location
    for elem in root.iter():
        if _local(elem.tag) == "URLBase" and (elem.text or "").strip():
            base = (elem.text or "").strip()
        if _local(elem.tag) != "service":
            continue
        fields = {_local(child.tag): (child.text or "").strip() for child in elem}
        if fields.get("serviceType") in WAN_SERVICES and fields.get("controlURL"):
            found.setdefault(fields["serviceType"], fields["controlURL"])
    for service_type in WAN_SERVICES:
        if service_type in found:
            try:
                url = urljoin(base, found[service_type])
            except ValueError as exc:
                raise UpnpParseError(f"bad control URL: {exc}") from None
            if _split_url(url).scheme != "http":
                raise UpnpParseError(f"control URL is not http: {url[:100]!r}")
            return Service(url, service_type)
    raise UpnpParseError("the device describes no WANIPConnection or WANPPPConnection service")


def http_get(url: str) -> bytes:
    parts = urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode()


def soap_request(service: Service, action: str, args: list[tuple[str, str]]) -> bytes:
    """An HTTP POST carrying one SOAP action (arguments in the order the service declares them)."""
    parts = urlsplit(service.control_url)
    inner = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in args)
    body = (
        '<?xml version="1.0"?>\r\n'
        f'<s:Envelope xmlns:s="{_SOAP_ENV}" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
        f'<s:Body><u:{action} xmlns:u="{service.service_type}">{inner}</u:{action}></s:Body></s:Envelope>\r\n'
    ).encode()
    head = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        'Content-Type: text/xml; charset="utf-8"\r\n'
        f'SOAPAction: "{service.service_type}#{action}"\r\n'
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def parse_http_body(data: bytes) -> tuple[int, bytes]:
    """Status code and body of a complete HTTP/1.x response (read until the server closed)."""
    status, _, body = _split_http(data, require_body=True)
    fields = status.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
        raise UpnpParseError(f"not an HTTP status line: {status[:60]!r}")
    return int(fields[1]), body


def parse_soap_response(data: bytes, action: str) -> dict[str, str]:
    """The output arguments of a SOAP action's HTTP response; UpnpActionError for a fault."""
    code, body = parse_http_body(data)
    root = _xml(body)
    if code != 200:
        fault = {_local(e.tag): (e.text or "").strip() for e in root.iter()}
        raw = fault.get("errorCode", "")
        if not raw.isdigit():
            raise UpnpParseError(f"HTTP {code} without a UPnP errorCode")
        raise UpnpActionError(int(raw), fault.get("errorDescription", ""))
    for elem in root.iter():
        if _local(elem.tag) == f"{action}Response":
            return {_local(child.tag): (child.text or "").strip() for child in elem}
    raise UpnpParseError(f"no {action}Response in the SOAP body")


def add_port_mapping_args(external_port: int, internal_port: int, client_ip: str, lifetime: int,
                          description: str) -> list[tuple[str, str]]:
    """Arguments of AddPortMapping and AddAnyPortMapping (same names, same order)."""
    return [("NewRemoteHost", ""), ("NewExternalPort", str(external_port)), ("NewProtocol", "TCP"),
            ("NewInternalPort", str(internal_port)), ("NewInternalClient", client_ip), ("NewEnabled", "1"),
            ("NewPortMappingDescription", description), ("NewLeaseDuration", str(lifetime))]


def delete_port_mapping_args(external_port: int) -> list[tuple[str, str]]:
    return [("NewRemoteHost", ""), ("NewExternalPort", str(external_port)), ("NewProtocol", "TCP")]


def _split_http(data: bytes, *, require_body: bool) -> tuple[str, dict[str, str], bytes]:
    if len(data) > MAX_HTTP:
        raise UpnpParseError(f"HTTP message of {len(data)} bytes exceeds {MAX_HTTP}")
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep and require_body:
        raise UpnpParseError("HTTP message without the blank line after its headers")
    try:
        lines = head.decode("latin-1").split("\r\n")
    except UnicodeDecodeError as exc:  # latin-1 decodes every byte; kept for clarity of intent
        raise UpnpParseError(str(exc)) from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    elif "content-length" in headers and headers["content-length"].isdigit():
        body = body[: int(headers["content-length"])]
    return lines[0], headers, body


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep:
            raise UpnpParseError("truncated chunked body")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            raise UpnpParseError(f"bad chunk size {size_line[:20]!r}") from None
        if size == 0:
            return bytes(out)
        if len(rest) < size + 2:
            raise UpnpParseError("truncated chunk")
        out += rest[:size]
        data = rest[size + 2:]


def _split_url(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port out of range)
    except ValueError as exc:
        raise UpnpParseError(f"bad URL {url[:100]!r}: {exc}") from None
    return parts


def _xml(body: bytes) -> ET.Element:
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise UpnpParseError("XML with a DTD or entities is refused")  # no entity expansion, ever
    try:
        return ET.fromstring(body)
    except (ET.ParseError, ValueError, LookupError) as exc:  # LookupError: an unknown declared encoding
        raise UpnpParseError(f"bad XML: {exc}") from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]
