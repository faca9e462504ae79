// Documents that carry code. These also match when the container is damaged
// and cannot be parsed, which is where YARA adds to the structural checks.

rule bastion_ole_vba_macros
{
    meta:
        description = "an Office document with VBA macros"
    strings:
        $vba_project = "_VBA_PROJECT" wide
        $vba_dir = "VBA" wide fullword
        $macros = "Macros" wide fullword
    condition:
        uint32be(0) == 0xD0CF11E0 and ($vba_project or ($macros and $vba_dir))
}

rule bastion_ooxml_vba_project
{
    meta:
        description = "an Office document with a VBA macro project"
    strings:
        $vba_bin = "vbaProject.bin" nocase
        $macro_type = "macroEnabled" nocase
    condition:
        uint32be(0) == 0x504B0304 and ($vba_bin or $macro_type)
}

rule bastion_msi_installer
{
    meta:
        description = "a Windows Installer package"
    strings:
        // CLSID {000C1084-0000-0000-C000-000000000046} of the MSI root storage
        $msi_clsid = { 84 10 0C 00 00 00 00 00 C0 00 00 00 00 00 00 46 }
    condition:
        uint32be(0) == 0xD0CF11E0 and $msi_clsid
}

rule bastion_pdf_launch_action
{
    meta:
        description = "a PDF that asks to launch a program"
    strings:
        $pdf = "%PDF-"
        $launch = /\/Launch[\s\/<>\[\]()]/
    condition:
        $pdf in (0..1024) and $launch
}
