// Scanning the other person's QR code with the camera, decoded in the page by jsQR (the
// vendored, pinned decoder: Chromium on Linux has no BarcodeDetector). The decoded bytes go
// to the gateway, which marks the contact verified only if they match both keys.

const FRAME_MS = 150;
const GIVE_UP_MS = 120000;

export class Scanner {
  constructor(video) {
    this.video = video;
    this.stream = null;
    this.stopped = false;
  }

  async scan() {
    if (!navigator.mediaDevices?.getUserMedia) throw new Error("This browser cannot use a camera here.");
    if (typeof window.jsQR !== "function") throw new Error("The QR decoder did not load.");
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
    } catch (e) {
      throw new Error(`The camera could not be opened (${e.name}). Allow the camera for this page, or compare emoji instead.`);
    }
    this.video.srcObject = this.stream;
    await this.video.play();
    const canvas = document.createElement("canvas");
    const context = canvas.getContext("2d", { willReadFrequently: true });
    const started = Date.now();
    while (!this.stopped) {
      if (Date.now() - started > GIVE_UP_MS) throw new Error("No QR code was found. Try again with more light, or compare emoji.");
      const { videoWidth: w, videoHeight: h } = this.video;
      if (w && h) {
        canvas.width = w; canvas.height = h;
        context.drawImage(this.video, 0, 0, w, h);
        const found = window.jsQR(context.getImageData(0, 0, w, h).data, w, h, { inversionAttempts: "attemptBoth" });
        if (found && found.binaryData.length) return toBase64(found.binaryData);
      }
      await new Promise((r) => setTimeout(r, FRAME_MS));
    }
    throw new Error("Scanning stopped.");
  }

  stop() {
    this.stopped = true;
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    this.video.srcObject = null;
  }
}

function toBase64(bytes) {
  let text = "";
  for (const b of bytes) text += String.fromCharCode(b);
  return btoa(text);
}
