// The recording's part of the call pages (docs/protocol.md, "Recording"):
// the therapist's Record button, the patient's question, the indicator with
// its elapsed time and Stop button, and a sentence for every outcome. The
// server decides the state; this only shows it and sends the clicks.
import { formatDuration, say } from "./i18n.js";

const $ = (id) => document.getElementById(id);

// Why a recording stopped, in the words of each side.
const OFF_TEXT = {
  therapist: {
    stopped_by_therapist: "recording.off.youStopped",
    stopped_by_patient: "recording.off.patientStopped",
  },
  patient: {
    stopped_by_therapist: "recording.off.therapistStopped",
    stopped_by_patient: "recording.off.youStopped",
  },
  both: {
    participant_left: "recording.off.participant_left",
    consult_ended: "recording.off.consult_ended",
    storage_full: "recording.off.storage_full",
    recorder_failed: "recording.off.recorder_failed",
    server_restart: "recording.off.server_restart",
  },
};
// The server refused a recording message (protocol "error" with its ref).
const ERROR_TEXT = {
  recording_unavailable: "recording.error.recording_unavailable",
  recording_state: "recording.error.recording_state",
  guardian_consent_required: "recording.error.guardian_consent_required",
  peer_absent: "recording.error.peer_absent",
  not_admitted: "recording.error.not_admitted",
};
const RECORDING_REFS = new Set(["record-request", "record-consent", "record-stop", "recorder-offer"]);

export class RecordingView {
  // role: "therapist" | "patient"; getCall: () => the current ConsultCall;
  // guardianDefault: () => whether the invite asks a guardian (the patient's
  // page knows it from the invite; a "requested" message says it too).
  constructor({ role, getCall, guardianDefault = () => false }) {
    this.role = role;
    this.getCall = getCall;
    this.guardianDefault = guardianDefault;
    this.state = "off";
    this.guardian = false;
    this.onSinceMs = null;
    this.ticker = null;
    this.connected = false;
    this.answered = false;
    this.messageKey = null;
    this.wire();
    this.reset();
  }

  wire() {
    // Both withdraw what there is: the question, the consent, the recording.
    $("recording-stop").addEventListener("click", () => this.stop());
    $("recording-action").addEventListener("click", () => this.stop());
    if (this.role === "therapist") {
      $("record").addEventListener("click", () => {
        $("record").disabled = true;
        this.message(null);
        if (!this.call("requestRecording")) this.render();
      });
    } else {
      $("record-yes").addEventListener("click", () => this.answer(true));
      $("record-no").addEventListener("click", () => this.answer(false));
    }
  }

  call(method, ...args) {
    const call = this.getCall();
    return call ? call[method](...args) : false;
  }

  // A new call (or none): nothing is being recorded, nothing to say.
  reset() {
    this.state = "off";
    this.connected = false;
    this.message(null);
    this.render();
  }

  // The therapist may ask only while the patient is connected.
  setConnected(connected) {
    this.connected = connected;
    this.render();
  }

  // The state a (re)connect finds: shown as the server says, and never a
  // reason to start anything (call.js opens no recorder link for it).
  welcome(state) {
    const before = this.state;
    if (state === "off" && before !== "off") {
      // We were away when it stopped: a dropped connection always stops it.
      this.message(before === "requested" ? null : OFF_TEXT.both.participant_left);
    } else if (state === "requested" && this.role === "therapist") {
      this.message("recording.waitingAnswer");
    } else if (state === "starting") {
      this.message("recording.starting");
    } else if (state === "on") {
      this.message(null);
    }
    this.enter(state, { guardian: this.guardianDefault() });
  }

  // A "recording" message from the server.
  update(message) {
    const before = this.state;
    switch (message.state) {
      case "requested":
        this.message(this.role === "therapist" ? "recording.waitingAnswer" : null);
        this.enter("requested", { guardian: message.guardian_required ?? this.guardianDefault() });
        break;
      case "refused":
        this.message(this.role === "therapist" ? "recording.refused.therapist" : "recording.refused.patient");
        this.enter("off");
        break;
      case "starting":
        this.message("recording.starting");
        this.enter("starting");
        break;
      case "on":
        this.message(null);
        this.enter("on");
        break;
      case "off":
        this.message(this.offText(message.reason, before));
        this.enter("off");
        break;
      default:
        break;
    }
  }

  offText(reason, before) {
    if (before === "requested" && reason === "stopped_by_therapist") {
      return this.role === "therapist" ? "recording.withdrawn.therapist" : "recording.withdrawn.patient";
    }
    if (before === "starting" && reason === "recorder_failed") return "recording.off.startFailed";
    return OFF_TEXT[this.role][reason] || OFF_TEXT.both[reason] || "recording.off.other";
  }

  // The recorder link could not be opened on this device.
  recorderProblem(state) {
    if (state === "no-microphone") this.message("recording.noMicrophone");
  }

  // A protocol error; true when it was about the recording (and shown).
  error(message) {
    if (!RECORDING_REFS.has(message.ref)) return false;
    this.message(ERROR_TEXT[message.code] || "recording.error.other");
    this.answered = false;
    this.render();
    return true;
  }

  answer(agree) {
    $("record-yes").disabled = true;
    $("record-no").disabled = true;
    this.answered = this.call("answerRecording", agree, this.guardian ? "guardian" : "patient");
    this.render();
  }

  stop() {
    $("recording-stop").disabled = true;
    $("recording-action").disabled = true;
    if (!this.call("stopRecording")) this.render();
  }

  enter(state, { guardian = this.guardian } = {}) {
    const wasOn = this.state === "on";
    this.state = state;
    this.guardian = Boolean(guardian);
    this.answered = false;
    if (state === "on" && !wasOn) {
      // Counted from the moment this page heard "on": the browser's clock
      // may differ from the server's (started_at), the page's own does not.
      this.onSinceMs = performance.now();
      this.ticker = setInterval(() => this.tick(), 1000);
    } else if (state !== "on") {
      clearInterval(this.ticker);
      this.ticker = null;
      this.onSinceMs = null;
    }
    this.render();
    if (state === "requested" && this.role === "patient") $("record-no").focus();
  }

  tick() {
    if (this.onSinceMs === null) return;
    const seconds = Math.floor((performance.now() - this.onSinceMs) / 1000);
    $("recording-elapsed").textContent = formatDuration(seconds);
  }

  message(key) {
    this.messageKey = key;
  }

  render() {
    const state = this.state;
    $("recording-indicator").hidden = state !== "on";
    $("recording-stop").disabled = false;
    if (state === "on") this.tick();
    else $("recording-elapsed").textContent = formatDuration(0);
    $("recording-status").hidden = !this.messageKey;
    if (this.messageKey) say($("recording-text"), this.messageKey);
    // Beside the message: the therapist may withdraw an open question, and
    // either may stop a recording that is still starting (the consent too
    // can be taken back at any time).
    const action = $("recording-action");
    const withdraw = state === "requested" && this.role === "therapist";
    action.hidden = !(withdraw || state === "starting");
    action.disabled = false;
    say(action, withdraw ? "recording.withdraw" : "recording.stop");
    if (this.role === "therapist") {
      $("record").hidden = state !== "off";
      $("record").disabled = !this.connected;
    } else {
      const question = $("record-question");
      const asking = state === "requested" && !this.answered;
      if (asking && question.hidden) {
        say($("record-question-title"), this.guardian ? "recording.question.guardianTitle" : "recording.question.title");
        say($("record-question-text"), this.guardian ? "recording.question.guardianText" : "recording.question.text");
        $("record-yes").disabled = false;
        $("record-no").disabled = false;
      }
      question.hidden = !asking;
    }
  }
}
