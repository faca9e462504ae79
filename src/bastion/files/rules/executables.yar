// Programs recognised by structure wherever they start at the beginning of a
// file or an archive member, as a second line behind the magic-number checks.

rule bastion_pe_executable
{
    meta:
        description = "a Windows program (PE executable)"
    condition:
        uint16(0) == 0x5A4D and filesize >= 0x40 and uint32(0x3C) < filesize - 4
        and uint32(uint32(0x3C)) == 0x00004550
}

rule bastion_windows_shortcut
{
    meta:
        description = "a Windows shortcut"
    condition:
        uint32(0) == 0x0000004C and uint32(4) == 0x00021401
}

rule bastion_html_application
{
    meta:
        description = "an HTML application (HTA)"
    strings:
        $hta = "<HTA:APPLICATION" nocase
    condition:
        $hta
}
