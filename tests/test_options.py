"""gateway.options: Appendix A of the guide as two-way tables, checked entry by entry."""

from __future__ import annotations

import pytest

from gateway import options as O

ALL = [(f, o) for f in O.FAMILIES.values() for o in f.options]
FLAG_FAMILIES = [f for f in O.FAMILIES.values() if isinstance(f, O.FlagFamily)]

# Spot checks against the guide text, one or more per family (value, const, friendly).
GUIDE = [
    (O.LAUNCH_OPTION, 1, "cLHRemoveFilesAfterCompleteOption", "RemoveFilesAfterComplete"),
    (O.LAUNCH_OPTION, 1024, "cLHCheckListOption", "CheckList"),
    (O.JOB_OPTION, 2147483648, "cJBRemoveFilesAfterComplete", "RemoveFilesAfterComplete"),
    (O.JOB_OPTION, 262144, "cJBConverTextToHTMLMask", "ConverTextToHTML"),
    (O.LINK_OPTION, 64, "cLKNotTrackOpenMask", "NotTrackOpen"),
    (O.LINK_OPTION, 128, "cLKNotTrackAllLinkMask", "NotTrackAllLink"),
    (O.LIST_OPTION, 1, "cLTKeepToHeader", "KeepToHeader"),
    (O.LIST_OPTION, 2, "cLTKeepCcHeader", "KeepCcHeader"),
    (O.LIST_OPTION, 65536, "cLTBypassAllListProcessFilter", "BypassAllListProcessFilter"),
    (O.SEND_OPTION, 0, "cSDSendMainListOnly", "SendMainListOnly"),
    (O.SEND_OPTION, 4, "cSDSendBothList", "SendBothList"),
    (O.FORMER_CONTENT, 128, "cFormerCTToDisplayMask", "ToDisplay"),
    (O.FORMER_LIST, 4096, "cFormerLTClickNotOpenMask", "ClickNotOpen"),
    (O.ATTACH_OPTION, 8, "cAtachShowThirdPartyMask", "ShowThirdParty"),
    (O.ATTACH_OPTION, 16384, "cAttachTrackClickMask", "TrackClick"),
    (O.LINK_TYPE, 524288, "cReadReciptMask", "ReadRecipt"),
    (O.LINK_CLASS, 130, "eAttachReceipt2", "AttachReceipt2"),
    (O.EMAIL_DELIVERY_TYPE, 200, "ePaper", "Paper"),
    (O.MESSAGE_DELIVERY_TYPE, 400, "eIGPush", "IGPush"),
]
SIZES = {"LaunchOption": 11, "JobOption": 23, "LinkOption": 15, "ListOption": 20,
         "SendOption": 5, "FormerContent": 8, "FormerList": 13, "AttachOption": 15,
         "LinkType": 12, "LinkClass": 22, "EmailDeliveryType": 4, "MessageDeliveryType": 9}


@pytest.mark.parametrize("family,value,const,friendly", GUIDE)
def test_guide_entries(family, value, const, friendly) -> None:
    option = family.lookup(const)
    assert (option.value, option.const, option.name) == (value, const, friendly)


def test_family_sizes_match_the_guide() -> None:
    assert {f.name: len(f.options) for f in O.FAMILIES.values()} == SIZES


@pytest.mark.parametrize("family,option", ALL, ids=lambda x: getattr(x, "name", None))
def test_every_option_two_ways_any_case(family, option) -> None:
    for name in (option.name, option.const, option.name.upper(), option.const.lower(),
                 f"  {option.name.lower()} "):
        assert family.lookup(name) is option
    assert family.by_value(option.value) is option
    if isinstance(family, O.FlagFamily):
        assert family.encode([option.name]) == option.value
        assert family.decode(option.value) == ([option], 0)
        assert family.flag[option.name] == option.value
    else:
        assert family.parse(option.const) == option.value


@pytest.mark.parametrize("family", FLAG_FAMILIES, ids=lambda f: f.name)
def test_all_bits_round_trip_and_unknown_bits_are_reported(family) -> None:
    everything = family.encode([o.name for o in family.options])
    assert everything == family.known_mask & ~family.field_mask
    options, unknown = family.decode(everything)
    assert options == list(family.options) and unknown == 0
    free = next(1 << i for i in range(32) if not family.known_mask & (1 << i))
    assert family.decode(everything | free) == (list(family.options), free)
    assert family.flag(everything | free) == everything | free  # KEEP boundary


def test_link_type_low_byte_is_a_number_not_unknown_bits() -> None:
    assert O.LINK_TYPE.decode(256 + 14) == ([O.LINK_TYPE.lookup("MergeLink")], 0)


def test_parse_accepts_numbers_and_names_with_separators() -> None:
    for text in ("192", "NotTrackOpen|NotTrackAllLink", "nottrackopen, 128",
                 "cLKNotTrackOpenMask + cLKNotTrackAllLinkMask", "64 128"):
        assert O.LINK_OPTION.parse(text) == 192
    for text in ("", "NotTrackOpn", "4294967296", "-1"):
        with pytest.raises(ValueError):
            O.LINK_OPTION.parse(text)


def test_send_option_is_a_value_in_mask_15() -> None:
    assert O.SEND_LIST_MASK == O.SEND_OPTION.mask == 15
    assert [o.value for o in O.SEND_OPTION.options] == [0, 1, 2, 3, 4]
    assert not isinstance(O.SEND_OPTION, O.FlagFamily)


@pytest.mark.parametrize("name,family", [
    ("X-LinkOption", O.LINK_OPTION), ("x-listoption", O.LIST_OPTION),
    ("LinkType", O.LINK_TYPE), ("X-SendOption", O.SEND_OPTION), ("formerlist", O.FORMER_LIST)])
def test_family_by_header_or_name(name, family) -> None:
    assert O.family(name) is family


def test_unknown_family_names_the_known_ones() -> None:
    with pytest.raises(O.UnknownName, match="known: LaunchOption, JobOption"):
        O.family("X-Colour")


def test_intflag_names() -> None:
    assert O.LinkOption.NotTrackOpen | O.LinkOption.NotTrackAllLink == 192
    assert O.ListOption(65536).name == "BypassAllListProcessFilter"
