// Files that start a program or run script when opened, whatever their name.
// The structural checks in bastion.files.scan see most of these by type; these
// rules also catch them renamed, inside archives, or where the type check
// cannot look (a page in UTF-16, an SVG after a long comment).

rule bastion_onenote_section
{
    meta:
        description = "a OneNote section (it can carry programs that run with one click)"
    condition:
        // {7B5C52E4-D88C-4DA7-AEB1-5378D02996D3}: the header of a .one section file
        uint32be(0) == 0xE4525C7B and uint32be(4) == 0x8CD8A74D
        and uint32be(8) == 0xAEB15378 and uint32be(12) == 0xD02996D3
}

rule bastion_onenote_embedded_file
{
    meta:
        description = "a OneNote section with an embedded file"
    strings:
        // {BDE316E7-2665-4511-A4C4-8D4D0B7A9EAC}: a FileDataStoreObject (an attachment)
        $file_data_store = { E7 16 E3 BD 65 26 11 45 A4 C4 8D 4D 0B 7A 9E AC }
    condition:
        uint32be(0) == 0xE4525C7B and $file_data_store
}

rule bastion_clickonce_manifest
{
    meta:
        description = "a ClickOnce application manifest (it installs and runs a program)"
    strings:
        $asm = "urn:schemas-microsoft-com:asm.v" ascii wide nocase
        $deployment = "<deployment" ascii wide nocase
        $provider = "deploymentProvider" ascii wide nocase
        $entry = "<entryPoint" ascii wide nocase
    condition:
        $asm and ($deployment or $provider or $entry)
}

rule bastion_clickonce_shortcut
{
    meta:
        description = "a ClickOnce application shortcut (.appref-ms)"
    strings:
        $target = ".application#" ascii wide nocase
        $token = "PublicKeyToken=" ascii wide nocase
        $arch = "processorArchitecture=" ascii wide nocase
    condition:
        filesize < 64KB and $target and ($token or $arch)
}

rule bastion_svg_with_script
{
    meta:
        description = "an SVG image with script"
    strings:
        $svg = "<svg" ascii wide nocase
        $script = "<script" ascii wide nocase
        $javascript = "javascript:" ascii wide nocase
        $handler = /[\s"'\/;]on(load|error|click|mouseover|focus|begin|end|activate|animationstart)\s*=/ nocase
        $foreign = "<foreignObject" ascii wide nocase
    condition:
        $svg in (0..4096) and ($script or $javascript or $handler or $foreign)
}

rule bastion_html_smuggling
{
    meta:
        description = "a web page that builds a file to save (HTML smuggling)"
    strings:
        $script = "<script" ascii wide nocase
        $blob = "new Blob(" ascii wide nocase
        $save = "msSaveOrOpenBlob" ascii wide nocase
        $object_url = "createObjectURL" ascii wide nocase
        $download = ".download" ascii wide nocase
        $decode = "atob(" ascii wide nocase
        $bytes = "Uint8Array" ascii wide nocase
    condition:
        $script and ($save or ($blob and $object_url and $download)) and ($decode or $bytes)
}
