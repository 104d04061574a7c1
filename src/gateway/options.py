"""The ITPison option catalog: Appendix A of the provider guide as two-way tables.

Every family keeps the guide's constant names (``cLKNotTrackOpenMask``) and a short
friendly name derived from them (``NotTrackOpen``: the family prefix and a trailing
``Mask``/``Option`` removed).  Lookups ignore case and take either name, or a decimal
number.  Two kinds of family:

* :class:`FlagFamily`: independent bits (LaunchOption, JobOption, ListOption, LinkOption,
  FormerOption content and list, AttachOption, LinkType).  ``decode`` returns the known
  options *and* the unknown bits; what to do with unknown bits is the caller's policy,
  never decided here.  LinkType's low byte (``cLinkMask`` = 255) is a number, not flags.
* :class:`ValueFamily`: one value (SendOption, which lives inside ``cSDSendListMask`` = 15;
  LinkClass; the two delivery-type enums).

Each flag family also exposes an ``enum.IntFlag`` (``LINK_OPTION.flag``, e.g.
``LinkOption.NotTrackOpen``) with ``boundary=KEEP``, so unknown bits survive arithmetic.
This module is data only; validation and policy live in ``xheaders`` and ``optionpolicy``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

UINT32_MAX = 0xFFFFFFFF
_SEPARATORS = re.compile(r"[\s,|+]+")


@dataclass(frozen=True)
class Option:
    name: str  # friendly: NotTrackOpen
    const: str  # the guide's: cLKNotTrackOpenMask
    value: int
    note: str = ""  # the guide's comment, if any


class UnknownName(ValueError):
    """A name that is not in the family (the message names the family)."""


def _friendly(const: str, prefix: str) -> str:
    name = const[len(prefix):] if const.startswith(prefix) else const
    for suffix in ("Mask", "Option"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _options(prefixes: tuple[str, ...], rows: Iterable[tuple[str, int, str]]) -> tuple[Option, ...]:
    out = []
    for const, value, note in rows:
        prefix = next((p for p in prefixes if const.startswith(p)), "")
        out.append(Option(_friendly(const, prefix), const, value, note))
    return tuple(out)


@dataclass(frozen=True)
class _Family:
    name: str  # LinkOption
    options: tuple[Option, ...]
    _index: dict[str, Option] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, Option] = {}
        for option in self.options:
            for key in (option.name.lower(), option.const.lower()):
                if index.setdefault(key, option) is not option:
                    raise ValueError(f"{self.name}: name {key!r} used twice")
        object.__setattr__(self, "_index", index)

    def lookup(self, name: str) -> Option:
        """The option called ``name`` (friendly or guide name, any case)."""
        option = self._index.get(name.strip().lower())
        if option is None:
            raise UnknownName(f"{name!r} is not a {self.name} name")
        return option

    def by_value(self, value: int) -> Option | None:
        return next((o for o in self.options if o.value == value), None)


@dataclass(frozen=True)
class FlagFamily(_Family):
    """Independent bits; ``field_mask`` bits (LinkType's low byte) hold a number instead."""

    field_mask: int = 0
    flag: type[enum.IntFlag] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for option in self.options:
            if option.value & (option.value - 1) or option.value & self.field_mask:
                raise ValueError(f"{self.name}.{option.name}: {option.value} is not one free bit")
        members = {o.name: o.value for o in self.options}
        object.__setattr__(self, "flag", enum.IntFlag(self.name, members, boundary=enum.KEEP))

    @property
    def known_mask(self) -> int:
        mask = self.field_mask
        for option in self.options:
            mask |= option.value
        return mask

    def decode(self, value: int) -> tuple[list[Option], int]:
        """The options set in ``value`` (in bit order) and the bits the guide doesn't name."""
        if not 0 <= value <= UINT32_MAX:
            raise ValueError(f"{value} is outside 0..{UINT32_MAX}")
        return [o for o in self.options if value & o.value], value & ~self.known_mask

    def encode(self, names: Iterable[str | int]) -> int:
        """OR of the named options; integers and decimal strings are taken as bits as is."""
        value = 0
        for item in names:
            if isinstance(item, int):
                bits = item
            elif item.strip().isdigit():
                bits = int(item)
            else:
                bits = self.lookup(item).value
            if not 0 <= bits <= UINT32_MAX:
                raise ValueError(f"{bits} is outside 0..{UINT32_MAX}")
            value |= bits
        return value

    def parse(self, text: str) -> int:
        """A number, or names/numbers separated by ``|``, ``,``, ``+`` or blanks."""
        tokens = [t for t in _SEPARATORS.split(text.strip()) if t]
        if not tokens:
            raise ValueError("empty value")
        return self.encode(tokens)

    def names(self, value: int) -> list[str]:
        return [o.name for o in self.decode(value)[0]]


@dataclass(frozen=True)
class ValueFamily(_Family):
    """One value; with ``mask`` (SendOption: 15) the value is ``number & mask``."""

    mask: int | None = None

    def parse(self, text: str) -> int:
        text = text.strip()
        return int(text) if text.isdigit() else self.lookup(text).value


LAUNCH_OPTION = FlagFamily("LaunchOption", _options(("cLH",), [
    ("cLHRemoveFilesAfterCompleteOption", 1, ""),
    ("cLHRemoveDataAfterCompleteOption", 2, ""),
    ("cLHPendApproveOption", 4, "pended launch after approved"),
    ("cLHAutoGenRefNumberOption", 8, ""),
    ("cLHProcessSubListOption", 16, ""),
    ("cLHNotCreateJobFolderOption", 32, "launcher will use launch folder as job folder"),
    ("cLHNotCreateLaunchFolderOption", 64, "requester saves everything in db"),
    ("cLHCreateJobOption", 128, "requester creates job if possible"),
    ("cLHMLContentSampleListOption", 256, "multi-launch content"),
    ("cLHCheckExtTimeOption", 512, "check StartTime, ExpireTime from LaunchExtTimeInfo"),
    ("cLHCheckListOption", 1024, "check list count from LaunchCheckListInfo"),
]))

JOB_OPTION = FlagFamily("JobOption", _options(("cJB",), [
    ("cJBDoResendMask", 1, ""),
    ("cJBActiveContentMask", 2, "for asp or aspx dynamic merge content"),
    ("cJBCreateReportMask", 4, ""),
    ("cJBConvertHtmlToTextFormat", 8, ""),
    ("cJBDynaMergeMask", 16, "use dyna merge"),
    ("cJBMergeDelMask", 32, "user defined merge del"),
    ("cJBProcessOptionMask", 64, "user defined process option"),
    ("cJBBackupSendMessage", 128, "backup a copy of EML"),
    ("cJBAuditSendMessage", 256, "audit send EML"),
    ("cJBConvertContentToUTF8Mask", 512, ""),
    ("cJBAddContentLocationToHtml", 1024, ""),
    ("cJBGetSubjectFromHTMLTitleMask", 2048, ""),
    ("cJBAutoAdjustCharSetToContentCharSet", 8192, "charset follows the content"),
    ("cJBAutoAdjustHeaderCharSetToContentCharSet", 16384, "header charsets follow the content"),
    ("cJBLandSameWebFolderOnly", 32768, "if tracklayer > 0, only pages of the same web folder"),
    ("cJBAutoGetLandPageMask", 131072, ""),
    ("cJBConverTextToHTMLMask", 262144, ""),
    ("cJBAddExternRefToEmailMask", 1048576, ""),
    ("cJBSaveWebPageAsMht", 2097152, ""),
    ("cJBHtmlExtElementMask", 134217728, ""),
    ("cJBAddOutlookDeliveryReceiptMask", 268435456, ""),
    ("cJBAddOutlookReadReceiptMask", 536870912, ""),
    ("cJBRemoveFilesAfterComplete", 2147483648, ""),
]))

LINK_OPTION = FlagFamily("LinkOption", _options(("cLK",), [
    ("cLKConvertExtLinkToIntResource", 1, "0: cid/content-location images to links; 1: links to cid"),
    ("cLKAddQStrToLinkMask", 2, "append GA parameters to external links"),
    ("cLKKeepDuplicateLinkMask", 4, ""),
    ("cLKAutoCleanLink", 8, "remove amp; from links"),
    ("cLKAddBaseToUrl", 16, ""),
    ("cLKAutoGetLinkNameFromTextMask", 32, ""),
    ("cLKNotTrackOpenMask", 64, ""),
    ("cLKNotTrackAllLinkMask", 128, ""),
    ("cLKTrackNameLinkOnlyMask", 256, ""),
    ("cLKNotTrackMailToLinkMask", 512, ""),
    ("cLKTrackFrameLinkMask", 1024, ""),
    ("cLKNotTrackMMSMask", 2048, ""),
    ("cLKNotConvertMMSMask", 4096, ""),
    ("cLKNotConvertImageAsOpenLinkMask", 8192, ""),
    ("cLKTrackQRCodeLinkMask", 16384, ""),
]))

LIST_OPTION = FlagFamily("ListOption", _options(("cLT",), [
    ("cLTKeepToHeader", 1, "keep the job's To"),
    ("cLTKeepCcHeader", 2, ""),
    ("cLTAutoAdjustInvalidList", 8, ""),
    ("cLTNoLineEsc", 16, ""),
    ("cLTRemoveUnsubMask", 32, ""),
    ("cLTRemoveDupMask", 64, ""),
    ("cLTRemoveBlackMask", 128, ""),
    ("cLTRemoveWhiteMask", 256, ""),
    ("cLTRemoveReturnMask", 512, ""),
    ("cLTSampleListOnly", 1024, ""),
    ("cLTSampleAndSendAll", 2048, ""),
    ("cLTCheckListFileTypeFromListContent", 4096, ""),
    ("cLTNotExpandToAddress", 8192, "do not add the list's To column"),
    ("cLTNotExpandCcAddress", 16384, "do not add the list's Cc column"),
    ("cLTNotExpandBccAddress", 32768, "do not add the list's Bcc column"),
    ("cLTBypassAllListProcessFilter", 65536, "bypass all list filtering; add to NewListPool"),
    ("cLTRemoveDeliverMask", 131072, ""),
    ("cLTRemoveResponseMask", 262144, ""),
    ("cLTNotToRemoveSystemBlackMask", 524288, ""),
    ("cLTNotToRemoveSystemRemoveWhiteMask", 1048576, ""),
]))

SEND_LIST_MASK = 15  # cSDSendListMask
SEND_OPTION = ValueFamily("SendOption", _options(("cSD",), [
    ("cSDSendMainListOnly", 0, "email only"),
    ("cSDSendMainListFirst", 1, "email first, then SMS"),
    ("cSDSendSubListFirst", 2, "SMS first, then email"),
    ("cSDSendSubListOnly", 3, "SMS only"),
    ("cSDSendBothList", 4, "both email and SMS"),
]), mask=SEND_LIST_MASK)

FORMER_CONTENT = FlagFamily("FormerContent", _options(("cFormerCT",), [
    ("cFormerCTHtmlMask", 1, ""), ("cFormerCTTextMask", 2, ""),
    ("cFormerCTAttachmentMask", 4, ""), ("cFormerCTMergeMask", 8, ""),
    ("cFormerCTSubjectMask", 16, ""), ("cFormerCTFromDisplayMask", 32, ""),
    ("cFormerCTReplyDisplayMask", 64, ""), ("cFormerCTToDisplayMask", 128, ""),
]))

FORMER_LIST = FlagFamily("FormerList", _options(("cFormerLT",), [
    ("cFormerLTUnknownMask", 1, "not open"), ("cFormerLTOpenMask", 2, ""),
    ("cFormerLTOpenNotClickMask", 4, ""), ("cFormerLTClickMask", 8, ""),
    ("cFormerLTForwardMask", 16, ""), ("cFormerLTForwardOutMask", 32, ""),
    ("cFormerLTReturnMask", 64, ""), ("cFormerLTReplyMask", 128, ""),
    ("cFormerLTUnsubscribeMask", 256, ""), ("cFormerLTSubscribeMask", 512, ""),
    ("cFormerLTContactMask", 1024, ""), ("cFormerLTSendErrorMask", 2048, ""),
    ("cFormerLTClickNotOpenMask", 4096, ""),
]))

ATTACH_OPTION = FlagFamily("AttachOption", _options(("cAttach", "cAtach"), [
    ("cAttachConvertLinkMask", 1, "convert attachments to links"),
    ("cAttachAuthenticateMask", 2, "authenticate page (only without ConvertLink)"),
    ("cAttachTrackLinkMask", 4, "track link (only with ConvertLink)"),
    ("cAtachShowThirdPartyMask", 8, "third party shows the authenticate accept page"),
    ("cAttachPostThirdPartyMask", 16, "form posts directly to the third party"),
    ("cAttachAlignLinkMask", 32, "all attachment links on one line"),
    ("cAttachConvertPDFMask", 64, "convert attachments to PDF"),
    ("cAttachCheckSourceIPMask", 128, "check source is IP (else referer)"),
    ("cAttachSupportActiveMergeMask", 256, "dynamic merge (asp, aspx)"),
    ("cAttachCompressMask", 512, ""),
    ("cAttachUnCompressMask", 1024, ""),
    ("cAttachAsListFileMask", 2048, "attachment named AttAsListFileName is an email list"),
    ("cAttachSupportDynaMergeMask", 4096, "dynamic function merge"),
    ("cAttachTrackOpenMask", 8192, ""),
    ("cAttachTrackClickMask", 16384, ""),
]))

LINK_FIELD_MASK = 255  # cLinkMask: LinkType's low byte is a number
LINK_TYPE = FlagFamily("LinkType", _options(("c",), [
    ("cMergeLinkMask", 256, ""), ("cFrameLinkMask", 512, ""), ("cLandLinkMask", 1024, ""),
    ("cHTMLLinkMask", 2048, ""), ("cTextLinkMask", 4096, ""), ("cOpenLinkMask", 8192, ""),
    ("cQrcodeLinkMask", 16384, ""), ("cAddEmailMask", 32768, ""), ("cAddRefMask", 65536, ""),
    ("cAddQStrMask", 131072, ""), ("cNoUrlEncode", 262144, ""),
    ("cReadReciptMask", 524288, ""),
]), field_mask=LINK_FIELD_MASK)

LINK_CLASS = ValueFamily("LinkClass", _options(("e",), [
    ("eRegularLink", 0, ""), ("eOMISLink", 1, ""), ("eApproveLink", 2, ""),
    ("eForwardLink", 3, ""), ("eUnsubscribeLink", 4, ""), ("eSubscribeLink", 5, ""),
    ("eContactLink", 6, ""), ("eAuthenticateLink", 7, ""), ("eRegisterLink", 8, ""),
    ("eOrderLink", 9, ""), ("eUpdateLink", 10, ""), ("eQuestionaryLink", 11, ""),
    ("eActivateLink", 12, ""), ("eFromActivateLink", 13, ""), ("eAgreeLink", 14, ""),
    ("eConfirmLink", 15, ""), ("eStateLink", 16, ""), ("eReceiptLink", 17, ""),
    ("eEmailBodyLink", 100, ""), ("eAttachmentLink", 128, ""), ("eAttachReceipt", 129, ""),
    ("eAttachReceipt2", 130, ""),
]))

EMAIL_DELIVERY_TYPE = ValueFamily("EmailDeliveryType", _options(("e",), [  # JobType=2
    ("eEmail", 0, ""), ("eNews", 1, ""), ("eFax", 100, ""), ("ePaper", 200, ""),
]))

MESSAGE_DELIVERY_TYPE = ValueFamily("MessageDeliveryType", _options(("e",), [  # JobType=1
    ("eSMS", 0, "SMS"), ("eMMS", 1, "MMS"), ("eIM_MSN", 11, ""), ("eIM_Skype", 12, ""),
    ("eIM_Yahoo", 13, ""), ("eAppPush", 100, ""), ("eLinePush", 200, ""),
    ("eWeChatPush", 300, ""), ("eIGPush", 400, ""),
]))

FAMILIES: dict[str, FlagFamily | ValueFamily] = {f.name.lower(): f for f in (
    LAUNCH_OPTION, JOB_OPTION, LIST_OPTION, LINK_OPTION, SEND_OPTION, FORMER_CONTENT,
    FORMER_LIST, ATTACH_OPTION, LINK_TYPE, LINK_CLASS, EMAIL_DELIVERY_TYPE,
    MESSAGE_DELIVERY_TYPE)}

LaunchOption = LAUNCH_OPTION.flag
JobOption = JOB_OPTION.flag
ListOption = LIST_OPTION.flag
LinkOption = LINK_OPTION.flag


def family(name: str) -> FlagFamily | ValueFamily:
    """A family by its name (``LinkOption``) or an X-Header that carries it (``X-LinkOption``)."""
    key = name.strip().lower()
    key = key[2:] if key.startswith("x-") else key
    try:
        return FAMILIES[key]
    except KeyError:
        raise UnknownName(f"unknown option family {name!r}; known: "
                          + ", ".join(f.name for f in FAMILIES.values())) from None
