// The therapist's screen sharing (in place of the camera) and the switch to
// another camera or microphone mid-call, for app.js's call view.
import { say, t } from "./i18n.js";

const $ = (id) => document.getElementById(id);

export class TrackSwitcher {
  // getCall: the ConsultCall or null; getMedia: app.js's {stream, camera, microphone}.
  constructor({ getCall, getMedia }) {
    Object.assign(this, { getCall, getMedia });
    this.cameraTrack = null;
    this.screenTrack = null;
  }

  // A call opened with this stream: its camera is what sharing gives back.
  start(stream) {
    this.cameraTrack = stream ? stream.getVideoTracks()[0] || null : null;
  }

  // The call closed: sharing ends with it.
  stop() {
    if (this.screenTrack) this.screenTrack.stop();
    this.screenTrack = null;
  }

  async switchDevice(kind) {
    const media = this.getMedia();
    const call = this.getCall();
    const select = kind === "video" ? $("camera-select") : $("mic-select");
    const wanted = { deviceId: { exact: select.value } };
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia(kind === "video" ? { video: wanted } : { audio: wanted });
    } catch {
      say($("device-problem"), `devices.${kind === "video" ? "camera" : "microphone"}.busy`);
      $("device-problem").hidden = false;
      return;
    }
    const track = stream.getTracks()[0];
    // Muted or camera off stays so with the new device.
    const toggle = kind === "video" ? $("camera") : $("mute");
    track.enabled = toggle.getAttribute("aria-pressed") !== "true";
    const old = media.stream && media.stream.getTracks().find((each) => each.kind === kind);
    if (call) {
      await call.replaceTrack(kind, kind === "video" && this.screenTrack ? this.screenTrack : track);
      // The recording keeps the camera, even while the screen is shared.
      await call.replaceRecorderTrack(kind, track);
    }
    if (old) {
      media.stream.removeTrack(old);
      old.stop();
    }
    if (!media.stream) media.stream = new MediaStream();
    media.stream.addTrack(track);
    if (kind === "video") this.cameraTrack = track;
    $("local-video").srcObject = media.stream;
  }

  async stopShare() {
    if (!this.screenTrack) return;
    const track = this.screenTrack;
    this.screenTrack = null;
    track.stop();
    $("share").setAttribute("aria-pressed", "false");
    say($("share"), "app.call.share");
    const call = this.getCall();
    if (call && this.cameraTrack) await call.replaceTrack("video", this.cameraTrack);
  }

  async toggleShare() {
    if (this.screenTrack) {
      await this.stopShare();
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getDisplayMedia({ video: true });
    } catch {
      return; // the therapist cancelled the picker
    }
    const track = stream.getVideoTracks()[0];
    const call = this.getCall();
    if (!call || !(await call.replaceTrack("video", track))) {
      track.stop();
      alert(t("app.call.shareNeedsCamera"));
      return;
    }
    this.screenTrack = track;
    $("share").setAttribute("aria-pressed", "true");
    say($("share"), "app.call.stopShare");
    // The browser's own "Stop sharing" button ends the track.
    track.addEventListener("ended", () => {
      if (this.screenTrack === track) this.stopShare();
    });
  }
}
