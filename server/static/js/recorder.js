// The second, send-only RTCPeerConnection to the server's recorder
// (docs/protocol.md, "Recording"): the participant's own microphone and
// camera, the same tracks the other side gets. Opened only after the
// patient's consent (the server's "starting"), closed at "off".
//
// The recorder takes no trickled candidates: the offer goes out once ICE
// gathering is complete, or after GATHERING_TIMEOUT_MS with what has been
// gathered by then (a STUN or TURN server that does not answer must not
// hold the recording up; the host candidates come within milliseconds).

const GATHERING_TIMEOUT_MS = 4000;

function gatheringComplete(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", changed);
      resolve();
    };
    const changed = () => {
      if (pc.iceGatheringState === "complete") done();
    };
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener("icegatheringstatechange", changed);
  });
}

export class RecorderLink {
  // tracks: { audio, video } (video may be null: no camera);
  // onState(connectionState) for the page and the technical log.
  constructor({ iceServers, tracks, onState }) {
    this.pc = new RTCPeerConnection({ iceServers });
    this.closed = false;
    for (const kind of ["audio", "video"]) {
      if (tracks[kind]) this.pc.addTransceiver(tracks[kind], { direction: "sendonly" });
    }
    this.pc.addEventListener("connectionstatechange", () => {
      if (!this.closed) onState(this.pc.connectionState);
    });
  }

  // The offer's SDP with every candidate gathered so far in it; null when
  // the link was closed meanwhile.
  async offer() {
    const offer = await this.pc.createOffer();
    if (this.closed) return null;
    await this.pc.setLocalDescription(offer);
    await gatheringComplete(this.pc, GATHERING_TIMEOUT_MS);
    return this.closed ? null : this.pc.localDescription.sdp;
  }

  async accept(sdp) {
    if (this.closed || this.pc.signalingState !== "have-local-offer") return;
    await this.pc.setRemoteDescription({ type: "answer", sdp });
  }

  // Another camera or microphone: the recording follows it.
  async replaceTrack(kind, track) {
    const transceiver = this.pc.getTransceivers().find((t) => t.receiver.track.kind === kind);
    if (transceiver && !this.closed) await transceiver.sender.replaceTrack(track);
  }

  // Stops sending; the tracks themselves stay on (the call goes on with them).
  close() {
    if (this.closed) return;
    this.closed = true;
    this.pc.close();
  }
}
